"""``lorm-jax run --config tests/_stress_config.py``: the test suite's tiny config (tests/_tiny.py) for the CLI runs
of tests/test_stress.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._tiny import tiny_config  # noqa: E402


def get_config():
    return tiny_config()
