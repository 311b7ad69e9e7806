"""Tests for lorm_jax.data.augment (pure-jnp transforms)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax.data import augment as A


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 20, 20, 1), dtype=np.uint8)


def test_to_float_and_normalize(images):
    x = A.to_float(images)
    assert x.shape == (4, 20, 20, 3) and x.dtype == jnp.float32
    # x / 255 (or x · (1/255)) in float32: one or two roundings, ≤ 2u = 1.2e-7 relative
    np.testing.assert_allclose(np.asarray(x[..., 2]), images[..., 0] / 255.0, rtol=1e-6)
    z = A.normalize(x, A.HALF_MEAN, A.HALF_STD)
    assert float(z.min()) >= -1.0 and float(z.max()) <= 1.0
    np.testing.assert_allclose(np.asarray(A.normalize(jnp.ones((2, 3)), 0.5, 0.25)), 2.0)  # (1 − ½) / ¼: exact


train_jit = jax.jit(A.train_transform, static_argnums=2, static_argnames=("crop_scale", "crop_ratio", "flip", "method"))


@pytest.mark.slow
def test_train_transform_shapes_range_determinism(images):
    out = train_jit(jax.random.key(0), images, 12)
    assert out.shape == (4, 12, 12, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(train_jit(jax.random.key(0), images, 12)))
    assert not np.allclose(np.asarray(out), np.asarray(train_jit(jax.random.key(1), images, 12)))
    # per-example keys: identical inputs get different crops
    same = np.repeat(images[:1], 4, axis=0)
    o = np.asarray(train_jit(jax.random.key(2), same, 12))
    assert not np.allclose(o[0], o[1])
    # bicubic works and stays in range
    oc = train_jit(jax.random.key(0), images, 12, method="bicubic")
    assert float(oc.min()) >= 0.0 and float(oc.max()) <= 1.0


@pytest.mark.slow
def test_train_transform_vmap_over_clients(images):
    keys = jax.random.split(jax.random.key(0), 3)
    batch = jnp.stack([jnp.asarray(images)] * 3)  # [K, B, H, W, C]
    f = jax.jit(jax.vmap(functools.partial(A.train_transform, out_size=8)))
    out = f(keys, batch)
    assert out.shape == (3, 4, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(train_jit(keys[1], images, 8)), atol=1e-5)


@pytest.mark.slow
def test_identity_crop_and_exact_subcrop():
    img = jnp.asarray(np.random.default_rng(1).random((16, 16, 3), dtype=np.float32))
    z = A.random_resized_crop(jax.random.key(3), img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    crop8 = jax.jit(lambda k, im: (A.rrc_params(k, 16, 16, (0.25, 0.25), (1.0, 1.0)),
                                   A.random_resized_crop(k, im, 8, scale=(0.25, 0.25), ratio=(1.0, 1.0))))
    np.testing.assert_allclose(np.asarray(z), np.asarray(img), atol=1e-6)
    # area 1/4 at ratio 1 -> an 8x8 box; resampled to 8 it must equal the slice at the sampled position
    for s in range(5):
        key = jax.random.key(s)
        params, z = crop8(key, img)
        top, left, h, w = (int(v) for v in params)
        assert h == w == 8 and 0 <= top <= 8 and 0 <= left <= 8
        np.testing.assert_allclose(np.asarray(z), np.asarray(img[top:top + 8, left:left + 8]), atol=1e-6)


@pytest.mark.slow
def test_rrc_params_ranges_and_fallback():
    keys = jax.random.split(jax.random.key(0), 200)
    top, left, h, w = jax.jit(jax.vmap(lambda k: A.rrc_params(k, 32, 32)))(keys)
    top, left, h, w = (np.asarray(v) for v in (top, left, h, w))
    assert np.all((h >= 1) & (h <= 32) & (w >= 1) & (w <= 32))
    assert np.all((top >= 0) & (top + h <= 32) & (left >= 0) & (left + w <= 32))
    frac = h * w / 1024.0
    assert frac.min() < 0.2 and frac.max() > 0.7
    r = w / h
    assert r.min() >= 0.5 and r.max() <= 2.0
    # no candidate fits -> centre crop with ratio clipped to 4/3
    top, left, h, w = (int(v) for v in A.rrc_params(jax.random.key(1), 20, 40, scale=(2.0, 3.0)))
    assert (h, w, top, left) == (20, 27, 0, 6)


def test_random_flip_probability():
    img = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 1)
    outs = jax.jit(jax.vmap(lambda k: A.random_flip(k, img)))(jax.random.split(jax.random.key(0), 400))
    flipped = np.asarray(jnp.all(outs == img[:, ::-1], axis=(1, 2, 3)))
    kept = np.asarray(jnp.all(outs == img, axis=(1, 2, 3)))
    assert np.all(flipped ^ kept)
    assert 0.4 < flipped.mean() < 0.6


def test_no_crop_paths_and_random_crop(images):
    ident = A.train_transform(jax.random.key(0), images, 20, crop_scale=None, flip=False)
    np.testing.assert_allclose(np.asarray(ident), np.asarray(A.to_float(images)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(A.test_transform(images, 20)), np.asarray(ident), atol=1e-6)
    c = A.random_crop(jax.random.key(0), A.to_float(images)[0], 7)
    assert c.shape == (7, 7, 3)


def test_test_transform_resize_ratio(images):
    out = A.test_transform(images, 14, resize_ratio=16 / 14)
    assert out.shape == (4, 14, 14, 3)
    big = A.resize(A.to_float(images), 16)
    np.testing.assert_allclose(np.asarray(out), np.clip(np.asarray(big[:, 1:15, 1:15]), 0, 1), atol=1e-6)
    up = A.test_transform(images, 224, resize_ratio=256 / 224, method="bicubic")
    assert up.shape == (4, 224, 224, 3)
    with pytest.raises(ValueError):
        A.test_transform(images, 14, resize_ratio=0.5)
