"""LoRM paper setup, ImageNet-A (β in {1, 0.5, 0.2}): lorm-jax run --config=configs/paper/imagenet_a.py:1 --workdir ...

Everything is in reference_table.py (LORM_SPEC §10.5); see docs/PAPER_SETUP.md.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # config files are loaded by path (config_flags), not as a package
    sys.path.insert(0, _HERE)
from reference_table import paper_config  # noqa: E402


def get_config(beta=None):
    return paper_config("imagenet_a", beta)
