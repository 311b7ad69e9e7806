"""docs/EXTENDING.md's worked example: a user's config file that registers a dataset and a method, run by the real
command (issue #25)."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_block(doc: str, name: str) -> str:
    """The code block after ``<!-- example: NAME -->`` in the markdown file ``doc`` (relative to the repository)."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"{doc} lost its example block {name!r}"
    return match.group(1)


def example_file() -> str:
    return example_block("docs/EXTENDING.md", "my_experiment.py")


@pytest.mark.slow
def test_readme_whole_run_example(tmp_path, monkeypatch, capsys):
    """README's "A whole run from Python", as written."""
    monkeypatch.chdir(tmp_path)
    exec(compile(example_block("README.md", "whole run"), "README.md", "exec"), {})
    results = json.loads((tmp_path / "runs" / "tiny_beta01" / "results.json").read_text())
    assert results["config"]["data"]["beta"] == 0.1
    assert str(results["final_average_accuracy"]) in capsys.readouterr().out


@pytest.mark.slow
def test_extending_example_runs_from_the_command_line(tmp_path):
    config = tmp_path / "my_experiment.py"
    config.write_text(example_file())
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lorm_jax.cli", "run", "--config", str(config), "--workdir",
                           str(workdir), "--noprogress"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert (results["method"], results["dataset"], results["num_tasks"]) == ("lorm_mean_tasks", "stripes", 2)
    assert results["final_average_accuracy"] > 0.25  # 4 classes
    with open(workdir / "metrics.jsonl") as f:
        ends = [line for line in map(json.loads, f) if line["round"] == "end"]
    assert [e["upload_bytes"] for e in ends] == [0, 0]  # the method merges tasks without Gram sums


def test_registered_names_are_valid_everywhere(tmp_path):
    """Registering from a loaded config file: validation accepts the names, the built-ins stay protected."""
    from lorm_jax import config as config_lib
    from lorm_jax import data, methods
    file = tmp_path / "my_experiment.py"
    file.write_text(example_file())
    c = config_lib.load(str(file))
    config_lib.load(str(file))  # loading again (compare does) re-registers: no error
    config_lib.validate(c)
    assert "lorm_mean_tasks" in methods.NAMES and "stripes" in data.available()
    assert methods.get("lorm_mean_tasks", c).task_grams is False
    with pytest.raises(ValueError, match="built in"):
        methods.register("lorm", lambda c: None)
    with pytest.raises(ValueError, match="built in"):
        data.register("digits", lambda: None)


def test_register_a_backbone():
    from lorm_jax import backbones
    from lorm_jax import config as config_lib
    backbones.register("my_tiny_vit", lambda **options: backbones.get("tiny_vit", **options))
    c = config_lib.base_config()
    c.backbone.name = "my_tiny_vit"
    config_lib.validate(c)
    assert backbones.get("my_tiny_vit", width=16, heads=2).lora_shapes == backbones.get("tiny_vit", width=16,
                                                                                        heads=2).lora_shapes
    with pytest.raises(ValueError, match="built in"):
        backbones.register("tiny_vit", lambda **options: None)
