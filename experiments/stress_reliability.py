"""Acceptance runs of issue 17: every multi-device / multi-process mode of ``lorm-jax run`` beside CPU-burning
processes, and what a survivor does when a peer is lost. One command, a pass/fail summary at the end (exit 0 / 1)::

    python experiments/stress_reliability.py                       # configs/tiny.py, 10 x 8 devices, 5 x 2 processes
    python experiments/stress_reliability.py --runs8 2 --runs2 1 --lost kill1   # a quick subset

Checks (each a line of the summary):

- ``pool``: the launch pattern that deadlocked XLA's CPU thread pool (``tests/_scale_worker.py pool``) finishes on
  8 devices with :mod:`lorm_jax.runtime`'s settings. It is also run once with XLA's defaults as a control (expected to
  abort; reported, not a failure if it does not).
- ``8dev``: ``--runs8`` consecutive runs on ``--devices`` simulated devices beside ``--burners`` busy loops: none may
  fail, each accuracy matrix must equal the 1-device run's (exactly: ratios of integer counts).
- ``2proc``: ``--runs2`` two-process (gloo) runs beside the busy loops, process 1 started 0, 5, 10, 0, ... s after
  process 0; same checks.
- ``lost``: a peer lost after the first unit's checkpoint (``kill1``: SIGKILL process 1, ``kill0``: SIGKILL process 0,
  the coordinator, ``stop1``: SIGSTOP process 1, a hung peer): the survivor must exit non-zero within
  ``--lost-limit`` s with a message naming the lost process, and rerunning both processes must resume and give the
  1-device matrix.

The runs are launched and watched by :mod:`lorm_jax.testing.stress`, as in ``tests/test_stress.py`` (the in-suite,
smaller version).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from lorm_jax.testing import stress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pool_check(devices: int, with_runtime: bool, terminate_s: int = 20) -> dict:
    """``tests/_scale_worker.py pool`` on ``devices`` devices, with (or without) lorm_jax's runtime settings."""
    env = stress.cli_env(devices, f"--xla_cpu_collective_call_terminate_timeout_seconds={terminate_s}")
    args = [sys.executable, os.path.join(REPO, "tests", "_scale_worker.py"), "pool"]
    t0 = time.monotonic()
    proc = subprocess.run(args + ([] if with_runtime else ["--no-lorm-jax"]), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    return {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "stuck_warnings": proc.stderr.count("may be stuck"), "message": stress.last_error(proc.stderr)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
    ap.add_argument("--override", action="append", default=[], help="extra --config.key=value for every run")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--runs8", type=int, default=10)
    ap.add_argument("--runs2", type=int, default=5)
    ap.add_argument("--lost", default="kill1,kill0,stop1", help="comma list of kill1, kill0, stop1 (or 'none')")
    ap.add_argument("--lost-limit", type=float, default=120.0)
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--burner-nice", type=int, default=0, help="niceness added to the busy loops (0: same priority)")
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary directory)")
    ap.add_argument("--json", default=None, help="also write every outcome to this file")
    args = ap.parse_args(argv)
    base = args.workdir or tempfile.mkdtemp(prefix="lorm_stress_")
    os.makedirs(base, exist_ok=True)
    results, checks = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "args": vars(args)}, []

    def check(name: str, ok: bool, detail: str):
        checks.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    def matches(workdir) -> bool:
        return os.path.exists(os.path.join(workdir, "results.json")) and \
            np.array_equal(stress.accuracy_matrix(workdir), reference, equal_nan=True)  # NaN: tasks not yet seen

    control = pool_check(args.devices, with_runtime=False)
    print(f"[info] pool pattern with XLA's defaults (control): exit {control['rc']} after {control['seconds']} s"
          f" ({'aborted: the cause reproduces' if control['rc'] else 'finished: the cause did not reproduce'})",
          flush=True)
    fixed = pool_check(args.devices, with_runtime=True)
    results["pool"] = {"xla_defaults": control, "lorm_jax_runtime": fixed}
    check("pool", fixed["rc"] == 0, f"exit {fixed['rc']} after {fixed['seconds']} s with lorm_jax.runtime settings")

    ref_dir = os.path.join(base, "one_device")
    t0 = time.monotonic()
    out = stress.finish([stress.start(args.config, ref_dir, overrides=args.override)])[0]
    if stress.failure(out):
        check("reference", False, f"1-device run failed: {stress.failure(out)}")
        return _summary(checks, results, args.json)
    reference = stress.accuracy_matrix(ref_dir)
    results["reference"] = {"seconds": round(time.monotonic() - t0, 1), "accuracy_matrix": reference.tolist()}
    print(f"[info] 1-device reference: {results['reference']['seconds']} s, final accuracy row "
          f"{np.round(100 * reference[-1], 2).tolist()}", flush=True)

    with stress.cpu_burners(args.burners, args.burner_nice):
        results["8dev"] = []
        for i in range(args.runs8):
            workdir, load, t0 = os.path.join(base, f"dev{args.devices}_{i}"), os.getloadavg()[0], time.monotonic()
            out = stress.finish([stress.start(args.config, workdir, devices=args.devices, overrides=args.override)])[0]
            seconds, why = round(time.monotonic() - t0, 1), stress.failure(out)
            ok = why is None and matches(workdir)
            results["8dev"].append({"seconds": seconds, "load1": load, "ok": ok, "failure": why})
            check(f"8dev {i + 1}/{args.runs8}", ok, f"{seconds} s, load {load:.1f}, "
                  + (why or ("matrix == 1 device" if ok else "matrix differs from 1 device")))
        results["2proc"] = []
        for i in range(args.runs2):
            late = 5.0 * (i % 3)
            workdir, load, t0 = os.path.join(base, f"proc2_{i}"), os.getloadavg()[0], time.monotonic()
            outs = stress.run_two(args.config, workdir, late_s=late, overrides=args.override)
            seconds, whys = round(time.monotonic() - t0, 1), [stress.failure(o) for o in outs]
            ok = not any(whys) and matches(workdir)
            results["2proc"].append({"seconds": seconds, "load1": load, "late_s": late, "ok": ok, "failures": whys})
            check(f"2proc {i + 1}/{args.runs2}", ok, f"process 1 started {late:.0f} s late, {seconds} s, load "
                  f"{load:.1f}, " + ("; ".join(w for w in whys if w) or
                                     ("matrix == 1 device" if ok else "matrix differs from 1 device")))
        results["lost"] = {}
        for case in [c for c in args.lost.split(",") if c and c != "none"]:
            how, victim = {"kill1": ("kill", 1), "kill0": ("kill", 0), "stop1": ("stop", 1)}[case]
            workdir = os.path.join(base, f"lost_{case}")
            lost = stress.lose_peer(args.config, workdir, victim=victim, how=how, limit_s=args.lost_limit,
                             overrides=args.override)
            if "error" in lost:
                check(f"lost {case}", False, lost["error"])
                continue
            outs = stress.run_two(args.config, workdir, overrides=args.override, names=("rerun0", "rerun1"))
            whys = [stress.failure(o) for o in outs]
            resumed = "resumed" in outs[0][1] and not any(whys) and matches(workdir)
            lost.update(rerun_ok=resumed, rerun_failures=whys)
            results["lost"][case] = lost
            ok = lost["within_limit"] and lost["rc"] not in (0, None) and lost["names_peer"] and resumed
            check(f"lost {case}", ok,
                  f"survivor exit {lost['rc']} after {lost['seconds']} s "
                  f"({'names' if lost['names_peer'] else 'does NOT name'} process {victim}: {lost['message']!r}); "
                  f"rerun {'resumed, matrix == 1 device' if resumed else 'FAILED: ' + str(whys)}")
    return _summary(checks, results, args.json)


def _summary(checks, results, json_path) -> int:
    failed = [name for name, ok, _ in checks if not ok]
    results["checks"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]
    results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nSUMMARY: {'PASS' if not failed else 'FAIL'} ({len(checks) - len(failed)}/{len(checks)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
