"""The `lorm-jax` command: help texts, and bad input ending in one line `lorm-jax: error: ...` with exit status 2.

The headline cases run the real command (`python -m lorm_jax.cli`, what the console script calls) in a subprocess;
the many other bad inputs call the same entry point, `cli.main(argv)`, in this process (a subprocess pays ~2 s of
imports each)."""
import json
import os
import re
import subprocess
import sys

import pytest

from lorm_jax import cli, continual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
JAX_NOTE = re.compile(r"(WARNING|I\d{4}|W\d{4}) ")  # JAX / XLA start-up notes on stderr, not ours


@pytest.fixture(autouse=True)
def _keep_logger_levels():
    """`run` quietens a few loggers of the process it runs in; give this test process its levels back."""
    import logging
    loggers = [logging.getLogger(name) for name in ("absl", "jax._src", "orbax")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def lorm_jax(*args, env=None):
    """The real command in a subprocess."""
    environ = {k: v for k, v in os.environ.items() if k != "LORM_JAX_VERBOSE"}
    return subprocess.run([sys.executable, "-m", "lorm_jax.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**environ, **(env or {})}, timeout=300)


def in_process(capsys, *args):
    """``cli.main`` in this process: (exit status, stdout, stderr)."""
    status = cli.main(["lorm-jax", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(status, out, err) -> str:
    """The message of the single `lorm-jax: error:` line that must be all of stderr (JAX's notes aside)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not JAX_NOTE.match(ln)]
    assert status == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("lorm-jax: error: "), err[-3000:]
    assert "Traceback" not in err and out == ""
    return lines[0][len("lorm-jax: error: "):]


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text)) - {"--help", "--config.KEY", "--verbose"}


def test_help_lists_every_verb_with_its_flags_and_an_example():
    proc = lorm_jax("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for name, verb in cli.VERBS.items():
        assert f"  {name} " in proc.stdout and verb.summary in proc.stdout
        assert f"lorm-jax {name} {verb.usage}" in proc.stdout and f"e.g. {verb.example}" in proc.stdout
        assert verb.example.startswith(f"lorm-jax {name}")
    assert "--verbose" in proc.stdout
    bare = lorm_jax()
    assert bare.returncode == 2 and "verbs:" in bare.stderr and bare.stdout == ""
    run_help = lorm_jax("run", "--help")
    assert run_help.returncode == 0 and cli.VERBS["run"].example in run_help.stdout
    assert "--config.KEY=VALUE" in run_help.stdout and flags_in(cli.VERBS["run"].usage) <= flags_in(run_help.stdout)


@pytest.mark.parametrize("verb", [v for v in cli.VERBS if v != "run"])  # run: in the test above
def test_verb_help_lists_the_flags_the_overview_names(verb, capsys):
    """Each verb's own --help exits 0 with its example and knows every flag the overview's usage line shows (so the
    overview cannot drift from the verbs' parsers, those of lorm_jax.compare and lorm_jax.bench included)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["lorm-jax", verb, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and cli.VERBS[verb].example in out and "usage: " in out
    assert flags_in(cli.VERBS[verb].usage) <= flags_in(out), out


def test_bad_value_through_the_real_command(tmp_path):
    workdir = tmp_path / "w"
    proc = lorm_jax("run", "--config", TINY, "--config.data.beta=-1", "--workdir", workdir, "--noprogress")
    msg = one_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert msg == "config.data.beta = -1.0 is invalid: the Dirichlet concentration must be a finite number > 0"
    assert not (workdir / "config.json").exists()
    verbose = lorm_jax("run", "--config", TINY, "--config.data.beta=-1", "--workdir", workdir, "--verbose")
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert "lorm_jax.config.InputError: config.data.beta = -1.0" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1] == f"lorm-jax: error: {msg}"


# (arguments after `--config TINY`, the start of the message after "lorm-jax: error: ", words it must contain)
BAD_RUNS = [
    (["--config.rnak=3"], "config.rnak = '3' is invalid: unknown key; did you mean 'rank'?", []),
    (["--config.data.betta", "0.1"], "config.data.betta = '0.1' is invalid: unknown key; did you mean 'beta'?", []),
    (["--config.rank=abc"], "config.rank = 'abc' is invalid: must be an integer", []),
    (["--config.eval_every_round=maybe"], "config.eval_every_round = 'maybe' is invalid: must be a bool", []),
    (["--config.backbone.options.depht=1"], "config.backbone.options.depht = '1' is invalid: unknown key", ["depth"]),
    (["--config.rank.x=1"], "config.rank.x = '1' is invalid: config.rank is not a dict", []),
    (["--config.num_clients=0", "--config.rank=64"], "config.num_clients = 0 is invalid: ", [">= 1"]),
    (["--config.data.classes_per_task=4"], "config.data.classes_per_task = 4 is invalid: must divide", []),
    (["--bogus", "1"], "run: unrecognized arguments: --bogus 1", ["lorm-jax run --help"]),
    (["--coordinator", "h:1"], "run: a multi-process launch needs", []),
]


@pytest.mark.parametrize("args,start,words", BAD_RUNS, ids=[" ".join(a) for a, _, _ in BAD_RUNS])
def test_run_with_bad_config_prints_one_line_and_exits_2(tmp_path, capsys, args, start, words):
    workdir = tmp_path / "w"
    msg = one_error_line(*in_process(capsys, "run", "--config", TINY, *args, "--workdir", workdir, "--noprogress"))
    assert msg.startswith(start) and all(w in msg for w in words), msg
    assert not (workdir / "config.json").exists()  # nothing written: the same workdir takes the fixed command


def test_bad_files_and_workdirs(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    msg = one_error_line(*in_process(capsys, "run", "--config", tmp_path / "nope.py", "--workdir", tmp_path / "w"))
    assert msg.startswith(f"--config {tmp_path / 'nope.py'}: config file '{tmp_path / 'nope.py'}' not found (give a "
                          "path, or one of the shipped configs: default, "), msg
    msg = one_error_line(*in_process(capsys, "run", "--config", TINY, "--workdir", a_file))
    assert msg == f"--workdir {a_file}: exists and is not a directory"
    msg = one_error_line(*in_process(capsys, "run", "--config", TINY, "--workdir", a_file / "sub"))
    assert msg.startswith(f"--workdir {a_file / 'sub'}: cannot create it")
    other = tmp_path / "other"  # a workdir that holds a run of another config
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"rank": 99}))
    assert "holds a run with a different config" in one_error_line(
        *in_process(capsys, "run", "--config", TINY, "--workdir", other))
    assert "required: --workdir" in one_error_line(*in_process(capsys, "run", "--config", TINY))


# Config files that do not load: (file text, the line named, what is said); the first three are the cases.
BAD_FILES = [
    ("def get_config(:\n    pass\n", 1, "SyntaxError: "),
    ("from lorm_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n    c.rank = 1 / 0\n"
     "    return c\n", 6, "ZeroDivisionError: division by zero"),
    ("RANK = 4\n", 1, "defines no get_config()"),
    ("import no_such_module_here\n", 1, "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("def get_config():\n    return {'rank': 4}\n", 1, "get_config() returned dict, not an ml_collections.ConfigDict"),
]


@pytest.mark.parametrize("text,line,what", BAD_FILES, ids=[w.split(":")[0] for _, _, w in BAD_FILES])
def test_config_file_that_does_not_load_is_one_line(tmp_path, capsys, text, line, what):
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    msg = one_error_line(*in_process(capsys, "run", "--config", bad, "--workdir", tmp_path / "w"))
    assert msg.startswith(f"{bad}:{line}: {what}"), msg
    assert not (tmp_path / "w").exists()


def test_config_file_errors_through_the_real_command(tmp_path):
    """The issue's three cases through the real entry point: one line, exit 2; --verbose keeps the traceback."""
    for text, line, what in BAD_FILES[:3]:
        bad = tmp_path / "bad.py"
        bad.write_text(text)
        proc = lorm_jax("run", "--config", bad, "--workdir", tmp_path / "w")
        assert one_error_line(proc.returncode, proc.stdout, proc.stderr).startswith(f"{bad}:{line}: {what}")
    bad.write_text(BAD_FILES[1][0])
    proc = lorm_jax("run", "--config", bad, "--workdir", tmp_path / "w", "--verbose")
    assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert f'File "{bad}", line 6, in get_config' in proc.stderr  # the original traceback, into the file


def test_shipped_configs_by_name(tmp_path):
    """A shipped config runs by its name from any directory (how a wheel runs them); ``paper/…:ARG`` included."""
    from lorm_jax import config as config_lib
    assert config_lib.load("tiny").to_dict() == config_lib.load(TINY).to_dict()
    assert config_lib.load("configs/tiny.py", ["--config.rank=2"]).rank == 2  # no such file here: the shipped one
    paper = config_lib.load("paper/cifar100:0.1")
    assert (paper.data.name, paper.rank) == ("tfds/cifar100", 16)
    assert {"tiny", "default", "paper/cifar100"} <= set(config_lib.shipped_names())
    assert "reference_table" not in " ".join(config_lib.shipped_names())


def test_other_verbs_bad_input(tmp_path, capsys):
    msg = one_error_line(*in_process(capsys, "report", tmp_path))
    assert msg.startswith(f"report: {tmp_path / 'results.json'} not found")
    assert "required: WORKDIR" in one_error_line(*in_process(capsys, "report"))
    msg = one_error_line(*in_process(capsys, "frobnicate"))
    assert msg.startswith("unknown verb 'frobnicate'; one of run, report, compare")
    msg = one_error_line(*in_process(capsys, "compare", "--config", TINY, "--methods", "lorm,nope"))
    assert msg.startswith("compare: argument --methods: unknown methods ['nope']")
    msg = one_error_line(*in_process(capsys, "compare", "--config", TINY, "--betas", "0.5,x"))
    assert msg.startswith("compare: argument --betas: '0.5,x' is not a comma-separated list of numbers")
    assert one_error_line(*in_process(capsys, "compare", "--config", TINY, "--config.rnak=1")).startswith(
        "config.rnak = '1'")
    status, _, err = in_process(capsys, "compare", "--config", TINY, "--methods", "lorm", "--reuse_only", "--out",
                                tmp_path / "study")
    assert status == 2 and "Traceback" not in err  # after a logged warning naming the unfinished run
    assert err.rstrip().splitlines()[-1] == f"lorm-jax: error: no finished runs in {tmp_path / 'study'} " \
                                            "(--reuse_only trains nothing)"
    msg = one_error_line(*in_process(capsys, "bench-merge", "--repeats", "x"))
    assert msg == "bench-merge: argument --repeats: invalid int value: 'x' (see lorm-jax bench-merge --help)"


def test_verbose_env_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORM_JAX_VERBOSE", "1")
    status, out, err = in_process(capsys, "run", "--config", TINY, "--config.rnak=3", "--workdir", tmp_path)
    assert status == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("lorm-jax: error: config.rnak = '3' is invalid: unknown key")


def test_an_error_inside_a_running_experiment_keeps_its_traceback(tmp_path, monkeypatch):
    """Not input: a ValueError raised while the experiment runs leaves main (so the process prints its traceback and
    exits 1), although InputError is a ValueError too."""
    def failing_run(*args, **kwargs):
        raise ValueError("a bug inside the run")
    monkeypatch.setattr(continual, "run", failing_run)
    with pytest.raises(ValueError, match="a bug inside the run"):
        cli.main(["lorm-jax", "run", "--config", TINY, "--workdir", str(tmp_path / "w"), "--noprogress"])


def test_report_of_a_finished_run(tmp_path, capsys):
    results = {"method": "lorm", "backbone": "tiny_vit", "dataset": "synthetic_images",
               "accuracy_after_task": [0.75, 0.5], "final_average_accuracy": 0.5,
               "final_average_accuracy_task_mean": 0.55, "forgetting": 0.25, "average_incremental_accuracy": 0.625}
    (tmp_path / "results.json").write_text(json.dumps(results))
    status, out, err = in_process(capsys, "report", tmp_path)
    assert status == 0, err
    assert f"## {tmp_path} (lorm, tiny_vit, synthetic_images)" in out
    assert "| 1 | 50.00 |" in out and "final average accuracy: 50.00% (task mean 55.00%)" in out
