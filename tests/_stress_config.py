"""``lorm-jax run --config tests/_stress_config.py``: the test suite's small config with a 1-block ViT
(``small_config(**ONE_BLOCK)`` of tests/conftest.py) for the CLI runs of tests/test_stress.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ONE_BLOCK, small_config  # noqa: E402


def get_config():
    return small_config(**ONE_BLOCK)
