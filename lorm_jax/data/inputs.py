"""From the dataset's host arrays to model inputs: encode once (text tokenized), then gather and transform on device.

:func:`encode` lays the data out as the programs read them: images ``uint8 [N, H·W·C]`` (one row per image: a row
gather needs no other layout of the whole array; XLA's TPU layouts pad a trailing 3-channel axis, and a ``[N, H, W,
3]`` argument was copied whole into another layout inside the training program: 7.5 GB for CIFAR-100 at 224 px,
docs/TPU.md), text ``int32 [N, T]`` ids and mask, labels ``int32 [N]``. ``prepare(data, idx [N], keys [N], train) ->
(model inputs, labels)`` gathers examples from these device arrays and applies the on-device augmentation of
:mod:`lorm_jax.data.augment`, example n with its own key ``keys[n]`` (the test transform needs none); it is traced
into the training, Gram and evaluation programs.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from lorm_jax.data import augment


def make_prepare(config, backbone, dataset) -> Callable:
    """``prepare(data, idx [N], keys [N], train) -> (model inputs, labels)`` for the arrays :func:`encode` makes of
    ``dataset``: gather examples on device and transform them, example n with its own key ``keys[n]``."""
    if dataset.kind == "text":
        def prepare(data, idx, keys, train):
            return {"input_ids": data["input_ids"][idx], "attention_mask": data["attention_mask"][idx]}, data["y"][idx]
        return prepare
    mean = tuple(config.data.mean) or backbone.mean
    std = tuple(config.data.std) or backbone.std
    size, mode, method = backbone.image_size, config.data.augment, config.data.interpolation
    ratio = config.data.test_resize_ratio or None

    def train_view(keys, images):
        if mode == "crop":  # Resize(round(size·ratio)) + RandomCrop(size) + flip (reference CUB-200)
            big = augment.resize(augment.to_float(images), int(round(size * (ratio or 1.0))), method=method)
            pair = jax.vmap(jax.random.split)(keys)  # [N, 2]: crop and flip key of each example
            crops = jax.vmap(lambda k, im: augment.random_crop(k, im, size))(pair[:, 0], big)
            return jax.vmap(augment.random_flip)(pair[:, 1], crops)
        return augment.train_views(keys, images, size, crop_scale=tuple(config.data.crop_scale) if mode == "rrc"
                                   else None, flip=mode in ("rrc", "flip"), method=method)

    image_shape = dataset.image_shape

    def prepare(data, idx, keys, train):
        images = data["x"][idx].reshape(idx.shape + image_shape)
        if train and mode != "none":
            x = train_view(keys, images)
        else:
            x = augment.test_transform(images, size, resize_ratio=ratio, method=method)
        return augment.normalize(x, mean, std), data["y"][idx]
    return prepare


def encode(dataset, backbone, max_len: int):
    """Host arrays of the model inputs (module docstring): images as uint8 rows, text tokenized once with the
    backbone's tokenizer."""
    def one(x, y):
        if dataset.kind == "text":
            tok = backbone.tokenize(list(x), max_len)
            return {"input_ids": np.asarray(tok["input_ids"], np.int32),
                    "attention_mask": np.asarray(tok["attention_mask"], np.int32), "y": y}
        return {"x": x.reshape(len(x), -1), "y": y}
    return one(dataset.x_train, dataset.y_train), one(dataset.x_test, dataset.y_test)
