"""Tiny end-to-end LoRM run for CI: random tiny ViT, synthetic class-conditional images, 3 tasks × 2 classes, 4 clients.

    lorm-jax run --config configs/tiny.py --workdir runs/tiny
"""
from lorm_jax.config import base_config


def get_config():
    c = base_config()
    c.description = "tiny ViT (random init) + synthetic images; CI smoke run"
    c.seed = 0
    c.backbone.name = "tiny_vit"
    c.backbone.options = {"image_size": 16, "patch": 4, "width": 32, "depth": 2, "heads": 2, "mlp": 64, "seed": 0}
    c.data.name = "synthetic_images"
    c.data.options = {"num_classes": 6, "n_train": 60, "n_test": 20, "image_size": 16, "seed": 0}
    c.data.classes_per_task = 2
    c.data.beta = 0.5
    c.data.min_samples = 6
    c.data.augment = "flip"
    c.num_clients = 4
    c.rounds = 3
    c.epochs = 2
    c.batch_size = 16
    c.lr = 1e-2
    c.rank = 4
    c.eval_every_round = True
    return c
