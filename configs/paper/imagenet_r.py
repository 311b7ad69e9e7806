"""LoRM paper setup, ImageNet-R (β in {0.5, 0.1, 0.05}):

    lorm-jax run --config=configs/paper/imagenet_r.py:0.5 --workdir ...

Everything is in reference_table.py (LORM_SPEC §10.5); see docs/PAPER_SETUP.md.
"""
from lorm_jax.config import sibling_module


def get_config(beta=None):
    return sibling_module(__file__, "reference_table.py").paper_config("imagenet_r", beta)
