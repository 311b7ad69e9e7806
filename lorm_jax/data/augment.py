"""Image transforms in pure ``jax.numpy`` (jit- and vmap-compatible, per-example PRNG keys), LORM_SPEC §10.4.

Layout is NHWC / HWC. Sizes, scale/ratio ranges and the interpolation method are static Python values; keys and
images may be traced. Interpolation methods: ``"bilinear"`` (= ``"linear"``), ``"bicubic"`` (= ``"cubic"``, Keys
kernel a = -0.5, while PyTorch uses a = -0.75), ``"lanczos3"``, ``"lanczos5"``; :func:`resize` also accepts
``"nearest"``. Transform outputs are clipped to [0, 1] (bicubic/lanczos can overshoot). Resampling matmuls run at
``RESAMPLE_PRECISION`` (HIGH: float32 on CPUs, three bfloat16 passes on TPUs).

Reference pipelines expressed with these functions (``x`` uint8 NHWC, ``k`` a key):

* CIFAR-100 / ImageNet-R train: ``train_transform(k, x, 224, crop_scale=(0.08, 1), method="bicubic")``;
  test: ``test_transform(x, 224, resize_ratio=256/224, method="bicubic")``; then ``normalize(., 0.5, 0.5)``.
* ImageNet-A: as above with ``crop_scale=(0.05, 1)`` and ImageNet mean/std.
* Cars: ``train_transform(k, x, 224, crop_scale=None)`` (flip only), test ``test_transform(x, 224)``, no normalize.
* EuroSAT: identity, i.e. ``train_transform(k, x, S, crop_scale=None, flip=False)`` = ``test_transform(x, S)``.

Difference from the reference: the reference first resizes every image to 224x224 on the CPU and then crops and
resizes again on the GPU; here the random crop and the resize to ``out_size`` are a single resampling of the source
image, and the kernel may read source pixels just outside the crop box (within the image).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["to_float", "resize", "random_resized_crop", "rrc_params", "random_flip", "random_crop",
           "center_crop", "train_transform", "train_views", "test_transform", "normalize",
           "IMAGENET_MEAN", "IMAGENET_STD", "HALF_MEAN", "HALF_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # ViT-B/16 augreg_in21k native normalisation
HALF_STD = (0.5, 0.5, 0.5)

_SCALE_METHODS = ("linear", "bilinear", "cubic", "bicubic", "lanczos3", "lanczos5")
# Resampling is a matmul with the kernel's weights. jax.image's default (HIGHEST: float32 as six bfloat16 passes on a
# TPU) takes XLA's TPU compiler 7.6 s for a batch of 16 random resized crops at 224 px, HIGH (three passes, ~1e-5 of
# the pixel range, far below the uint8 source's 1/255 step) 4.5 s (docs/TPU.md). CPUs compute float32 either way
# (bit-identical results).
RESAMPLE_PRECISION = jax.lax.Precision.HIGH


def to_float(images) -> jax.Array:
    """``[..., H, W, C]`` -> ``float32`` in [0, 1] with 3 channels.

    Integer input is divided by 255; float input is only cast. ``C == 1`` is repeated to 3 channels.
    """
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    elif x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got shape {x.shape}")
    return x


def resize(images, size: int, method: str = "bilinear", antialias: bool = True) -> jax.Array:
    """``[B, H, W, C] -> [B, size, size, C]`` with ``jax.image.resize`` (antialiased when downsampling)."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method=method, antialias=antialias,
                            precision=RESAMPLE_PRECISION)


def rrc_params(key, height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10):
    """Crop box ``(top, left, h, w)`` (float32 scalars holding integers) with torchvision
    ``RandomResizedCrop.get_params`` semantics.

    ``attempts`` candidates are drawn at once: ``area_frac ~ U(scale)``, ``log r ~ U(log ratio)``,
    ``w = round(sqrt(A * area_frac * r))``, ``h = round(sqrt(A * area_frac / r))`` with ``A = H W``; the first
    candidate with ``0 < w <= W`` and ``0 < h <= H`` is used, with ``top ~ U{0..H-h}`` and ``left ~ U{0..W-w}``.
    If none fits, fall back to a centre crop of the whole image with its aspect ratio clipped to ``ratio``.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = float(height * width)
    frac = jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
    logr = jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(logr)
    w = jnp.round(jnp.sqrt(area * frac * aspect))
    h = jnp.round(jnp.sqrt(area * frac / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(ok)
    found = ok[first]
    # Fallback (static): whole image, aspect ratio clipped into [min(ratio), max(ratio)], centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    h = jnp.where(found, h[first], float(fh))
    w = jnp.where(found, w[first], float(fw))
    top_r = jnp.clip(jnp.floor(jax.random.uniform(k_top) * (height - h + 1)), 0, height - h)
    left_r = jnp.clip(jnp.floor(jax.random.uniform(k_left) * (width - w + 1)), 0, width - w)
    top = jnp.where(found, top_r, float((height - fh) // 2))
    left = jnp.where(found, left_r, float((width - fw) // 2))
    return top, left, h, w


def _crop_resize(image, top, left, h, w, out_size: int, method: str):
    """Resample the box ``[top, top+h) x [left, left+w)`` of ``image [H, W, C]`` to ``[out, out, C]``:
    ``jax.image.scale_and_translate`` with ``scale = out / (h, w)``, ``translation = -(top, left) * scale``
    (input coordinate u maps to output coordinate ``u * scale + translation``), antialias off."""
    if method not in _SCALE_METHODS:
        raise ValueError(f"method must be one of {_SCALE_METHODS}, got {method!r}")
    sy, sx = out_size / h, out_size / w
    return jax.image.scale_and_translate(
        image, (out_size, out_size, image.shape[-1]), (0, 1),
        jnp.stack([sy, sx]).astype(jnp.float32), jnp.stack([-top * sy, -left * sx]).astype(jnp.float32),
        method=method, antialias=False, precision=RESAMPLE_PRECISION)


def random_resized_crop(key, image, out_size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), method: str = "bilinear") -> jax.Array:
    """Single image ``[H, W, C]`` float -> ``[out_size, out_size, C]``: a :func:`rrc_params` box resampled to
    ``out_size`` in one ``scale_and_translate``. With ``scale=(1, 1), ratio=(1, 1)`` on a square image this is a
    plain resize of the whole image (the identity when ``out_size == H``)."""
    top, left, h, w = rrc_params(key, image.shape[0], image.shape[1], scale, ratio)
    return _crop_resize(image, top, left, h, w, out_size, method)


def random_flip(key, image) -> jax.Array:
    """Horizontal flip (width axis = ``-2``) of ``[..., H, W, C]`` with probability 0.5."""
    return jnp.where(jax.random.bernoulli(key, 0.5), jnp.flip(image, axis=-2), image)


def random_crop(key, image, size: int) -> jax.Array:
    """Uniformly placed ``size x size`` crop of ``[H, W, C]`` (torchvision ``RandomCrop`` without padding)."""
    hh, ww, c = image.shape
    k1, k2 = jax.random.split(key)
    top = jax.random.randint(k1, (), 0, hh - size + 1)
    left = jax.random.randint(k2, (), 0, ww - size + 1)
    return jax.lax.dynamic_slice(image, (top, left, 0), (size, size, c))


def center_crop(images, size: int) -> jax.Array:
    """Centre ``size x size`` crop of ``[..., H, W, C]``; offsets ``int(round((H - size) / 2))`` as torchvision."""
    hh, ww = images.shape[-3], images.shape[-2]
    top, left = int(round((hh - size) / 2.0)), int(round((ww - size) / 2.0))
    return images[..., top:top + size, left:left + size, :]


def train_transform(key, images, out_size: int, *, crop_scale: Sequence[float] | None = (0.08, 1.0),
                    crop_ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                    method: str = "bilinear") -> jax.Array:
    """``[B, H, W, C]`` uint8 (or float in [0,1]) -> ``float32 [B, out, out, 3]`` in [0, 1].

    :func:`train_views` with the per-example keys ``jax.random.split(key, B)``. Deterministic given ``key``.
    """
    return train_views(jax.random.split(key, images.shape[0]), images, out_size, crop_scale=crop_scale,
                       crop_ratio=crop_ratio, flip=flip, method=method)


def train_views(keys, images, out_size: int, *, crop_scale: Sequence[float] | None = (0.08, 1.0),
                crop_ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True, method: str = "bilinear") -> jax.Array:
    """Per-example keys ``[B]`` and images ``[B, H, W, C]`` -> ``float32 [B, out, out, 3]`` in [0, 1].

    Example ``b`` splits ``keys[b]`` into crop and flip keys: ``RandomResizedCrop(out, crop_scale, crop_ratio)`` (or a
    plain resize when ``crop_scale is None``), then a horizontal flip with p = 0.5 if ``flip``. An example's view
    depends only on its own key, so batches that mix clients (packed passes) draw what per-client batches draw.
    """
    x = to_float(images)
    if crop_scale is None:
        x = resize(x, out_size, method=method)

    def one(k, img):
        kc, kf = jax.random.split(k)
        if crop_scale is not None:
            img = random_resized_crop(kc, img, out_size, crop_scale, crop_ratio, method)
        if flip:
            img = random_flip(kf, img)
        return img

    return jnp.clip(jax.vmap(one)(keys, x), 0.0, 1.0)


def test_transform(images, out_size: int, *, resize_ratio: float | None = None,
                   method: str = "bilinear") -> jax.Array:
    """``[B, H, W, C]`` uint8 -> ``float32 [B, out, out, 3]`` in [0, 1], deterministic.

    ``resize_ratio=None``: resize to ``out``. Otherwise resize to ``r = round(out * resize_ratio)`` (e.g. 256 for
    ``out=224, ratio=256/224``) and take the centre ``out x out`` crop (images are assumed square, as after the
    reference's CPU ``Resize((224, 224))``).
    """
    x = to_float(images)
    if resize_ratio is None:
        return jnp.clip(resize(x, out_size, method=method), 0.0, 1.0)
    r = int(round(out_size * resize_ratio))
    if r < out_size:
        raise ValueError(f"resize_ratio={resize_ratio} gives {r} < out_size={out_size}")
    return jnp.clip(center_crop(resize(x, r, method=method), out_size), 0.0, 1.0)


def normalize(x, mean, std) -> jax.Array:
    """``(x - mean) / std`` broadcast over the channel (last) axis; scalars allowed."""
    mean = jnp.asarray(np.asarray(mean, np.float32))
    std = jnp.asarray(np.asarray(std, np.float32))
    return (x - mean) / std
