"""Pieces shared by every backbone: the :class:`Backbone` record, the LoRA dense layer, Gram statistics, ``add_delta``.

Conventions (paper layout, see ``lorm_jax/lora.py``):

* A linear layer is ``y = W x + b`` with ``W ∈ R^{d_out×d_in}``; Flax stores ``kernel = Wᵀ`` of shape ``[d_in, d_out]``.
* LoRA on that layer adds ``ΔW = B A`` (``A: [r, d_in]``, ``B: [d_out, r]``, no α/r scaling) and is applied without ever
  forming ``W + B A``::

      y = x @ kernel + b + (x @ Aᵀ) @ Bᵀ                x: [..., d_in]

* The Gram of a layer is the second moment of its *input* over every row (all tokens of all examples)::

      "full":  G = Σ_n w_n x_n x_nᵀ   [d_in, d_in]          "diag":  g = Σ_n w_n x_n ⊙ x_n   [d_in]

  with ``[B, T, d_in]`` flattened to ``[B·T, d_in]`` and ``w_n`` the row weight (example weight × attention mask).

* Packed batches (several clients' examples in one batch, :mod:`lorm_jax.data.batching`) come as ``G`` equal,
  contiguous, client-pure *blocks* of examples. LoRA factors may then be given per block (``A: [G, r, d_in]``,
  ``B: [G, d_out, r]``) and the Grams are summed per client: with ``segments = (ids [G], K)`` a layer yields
  ``G_k = Σ_{n in blocks of client k} w_n x_n x_nᵀ``, i.e. ``[K, d_in, d_in]`` (or ``[K, d_in]``), computed as one
  Gram per block (a batched dot) and a segment sum over blocks, so it costs what the unsegmented Gram costs.
  With ``segments = BlockSums(fn, scale)`` no per-client Gram is formed at all: each layer hands its per-block Grams
  ``[G, ...]`` and its own per-block factors to ``fn`` and yields ``(fn(factors, grams), finite [G])``, e.g. the sums
  ``Σ_g A_g G_g`` a merge needs (linear in the Grams, so summed over blocks they are the sums over clients); the
  block Grams of one layer exist only inside that layer.

**Blocks are scanned.** A model's transformer blocks run as one ``nn.scan`` over block-stacked weights (big_vision's
``scan`` option): the block is traced and compiled once, not ``depth`` times, which is what compile time on TPU
(and CPU) is made of. So the frozen ``params`` hold every block's weights stacked under ``"blocks"``
(``params["blocks"]["mlp"]["fc1"]["kernel"]``: ``[depth, d_in, d_out]``), and the engine-facing layout stays per
layer: a LoRA path ``"block_03/mlp/fc1"`` names layer ``mlp/fc1`` of block 3. :meth:`Backbone.apply` stacks the
per-layer LoRA factors into the scanned ``"lora"`` collection (``[depth, ...]`` per layer kind) and unstacks the
``"grams"`` the layers sow, and :func:`add_delta` adds ``ΔW`` to the right slice.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

HIGHEST = jax.lax.Precision.HIGHEST
GRAM_MODES = (None, "diag", "full")
QKV_MODES = ("fused", "separate")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64: jax_enable_x64


class MissingAssetError(RuntimeError):
    """A pretrained-weight package (or the package needed to read it) is not installed; the message says how to fix."""


# ----------------------------------------------------------------------------------------------------------------------
# The record the engine works with.
# ----------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash/compare by identity, so a Backbone can be a static arg.
class Backbone:
    """A frozen pretrained transformer with LoRA on every linear layer of every block.

    ``apply`` and ``add_delta`` are pure functions of their arguments (``self`` only holds static structure), so they
    can be jitted, differentiated w.r.t. ``lora`` and vmapped over a leading client axis of ``lora``.
    """
    name: str
    kind: str                                   # "image" or "text"
    params: Any                                 # frozen pytree (nested dict of float32 arrays)
    lora_shapes: dict[str, tuple[int, int]]     # LoRA path -> (d_out, d_in), paper layout, sorted = depth order
    feature_dim: int
    source: str
    image_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    tokenize: Callable | None = None            # text: tokenize(list[str], max_len) -> {"input_ids", "attention_mask"}
    module: nn.Module | None = dataclasses.field(default=None, repr=False)  # the Flax module behind ``apply``

    def apply(self, params, lora, inputs, *, gram=None, weights=None, segments=None, grams_by_kind=False):
        """Features (and optionally per-layer input Grams) of a batch.

        Args:
          params: frozen pytree with the structure of ``self.params``.
          lora: ``{path: {"A": [r, d_in], "B": [d_out, r]}}`` for exactly ``self.lora_shapes``, or ``None``; or per
            block of examples ``{"A": [G, r, d_in], "B": [G, d_out, r]}`` (``G`` divides the batch; see above); or
            the same block-stacked by :meth:`stack_lora`.
          inputs: image: float32 ``[B, H, W, 3]`` (NHWC, already normalised with ``mean``/``std``, ``H = W =
            image_size``); text: ``{"input_ids": int [B, T], "attention_mask": int [B, T]}``.
          gram: ``None`` (no statistics), ``"diag"`` (``[d_in]`` per layer) or ``"full"`` (``[d_in, d_in]``).
          weights: optional float ``[B]`` per-example row weight for the Grams (0 for padded examples; default 1).
            Text rows are further multiplied by the token's attention mask. Does not affect ``features``.
          segments: optional ``(ids int [G], K)``: the batch is ``G`` equal blocks of examples and block g belongs to
            client ``ids[g]``; each Gram is then ``[K, ...]``, summed per client. Or :class:`BlockSums` (per-block
            ``lora``): each path then yields ``(reduction, finite [G])`` instead of a Gram.

          grams_by_kind: the Grams in the block layout ``{layer kind: [depth, ...]}`` (:func:`by_kind`), as the
            scan yields them, instead of per layer.

        Returns:
          ``(features float32 [B, feature_dim], grams)`` with ``grams = {}`` when ``gram is None``, else
          ``{path: G}`` for every path in ``lora_shapes``, accumulated in float32 (float64 with a float64 compute
          dtype).
        """
        if gram not in GRAM_MODES:
            raise ValueError(f"gram must be one of {GRAM_MODES}, got {gram!r}")
        self._check_inputs(inputs)
        variables = {"params": params}
        if lora is not None and BLOCKS in lora:  # already block-stacked (stack_lora)
            variables["lora"] = lora
        elif lora is not None:
            check_lora(lora, self.lora_shapes)
            variables["lora"] = self.stack_lora(lora)
        if gram is None:
            return self.module.apply(variables, inputs, gram=None, weights=weights), {}
        features, state = self.module.apply(variables, inputs, gram=gram, weights=weights, segments=segments,
                                            mutable=["grams"])
        flat = traverse_util.flatten_dict(state["grams"][BLOCKS], is_leaf=lambda path, _: path[-1:] == ("gram",))
        stacked = {"/".join(k[:-1]): g for k, g in flat.items()}
        if grams_by_kind:
            return features, stacked
        return features, by_layer(stacked)

    def stack_lora(self, lora):
        """Per-layer LoRA ``{path: {"A", "B"}}`` -> the scanned blocks' layout ``{"blocks": {layer: {"A": [depth, ...],
        "B": [depth, ...]}}}`` (what :meth:`apply` feeds the scan; an optimizer over it updates 2 arrays per layer
        kind instead of 2 per layer). Undone by ``by_layer(lora_by_kind(stacked))``."""
        return lora_collection(by_kind({p: lora[p] for p in self.lora_shapes}))

    def add_delta(self, params, deltas: Mapping[str, jax.Array]):
        """``params`` with ``W ← W + ΔW`` on each layer of ``deltas = {path: ΔW [d_out, d_in]}`` (any subset)."""
        return add_delta(params, deltas, self.lora_shapes)

    def _check_inputs(self, inputs):
        if self.kind == "image":
            shape = getattr(inputs, "shape", None)
            if shape is None or len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"{self.name}: expected images [B, H, W, 3] (NHWC), got shape {shape}")
            if self.image_size is not None and tuple(shape[1:3]) != (self.image_size, self.image_size):
                raise ValueError(f"{self.name} was built for {self.image_size}x{self.image_size} images, got "
                                 f"{shape[1]}x{shape[2]}; rebuild it with backbones.get(..., image_size={shape[1]})")
        else:
            if not isinstance(inputs, Mapping) or not {"input_ids", "attention_mask"} <= set(inputs):
                raise ValueError(f"{self.name}: expected a dict with 'input_ids' and 'attention_mask' [B, T]")


def check_lora(lora, lora_shapes):
    """Raise a readable error unless ``lora`` has exactly the paths of ``lora_shapes`` with matching factor shapes."""
    missing, unexpected = sorted(set(lora_shapes) - set(lora)), sorted(set(lora) - set(lora_shapes))
    if missing or unexpected:
        more = lambda xs: "..." if len(xs) > 4 else ""  # noqa: E731
        raise ValueError(f"LoRA paths do not match the backbone: missing {missing[:4]}{more(missing)}, "
                         f"unexpected {unexpected[:4]}{more(unexpected)}")
    for path, (d_out, d_in) in lora_shapes.items():
        a, b = lora[path]["A"], lora[path]["B"]
        if a.shape[-1] != d_in or b.shape[-2] != d_out or a.shape[-2] != b.shape[-1]:
            raise ValueError(f"LoRA {path!r}: A {a.shape} / B {b.shape} do not fit a layer with (d_out, d_in) = "
                             f"{(d_out, d_in)}; expected A [r, {d_in}], B [{d_out}, r]")


BLOCKS = "blocks"  # the scanned blocks' name in params, and in the "lora" / "grams" collections


def block_path(block: int, layer: str) -> str:
    """The LoRA path of ``layer`` (e.g. ``"mlp/fc1"``) in block ``block``: ``"block_03/mlp/fc1"``."""
    return f"block_{block:02d}/{layer}"


def _block_layers(lora_shapes) -> dict[str, tuple[str, int]]:
    """``{path: (layer, block)}``: ``"block_03/mlp/fc1"`` -> ``("mlp/fc1", 3)``."""
    out = {}
    for path in lora_shapes:
        block, layer = path.split("/", 1)
        out[path] = (layer, int(block[len("block_"):]))
    return out


def by_kind(tree: Mapping[str, Any], axis: int = 0) -> dict:
    """Per-layer values ``{path: x}`` (``"block_03/mlp/fc1"``) -> the *block layout* ``{layer kind: x stacked over
    blocks}`` (``{"mlp/fc1": [depth, ...]}``, block order; the block axis at ``axis``, e.g. 1 after a client axis;
    numpy leaves stay numpy). A computation that is the same for every layer runs on this layout as one ``jax.vmap``
    over the block axis: one op per layer kind, not one per layer (what compiling merges is made of: 4 kinds for a
    ViT, not 48 layers)."""
    by_layer: dict[str, list] = {}
    for path, (layer, block) in sorted(_block_layers(tree).items(), key=lambda kv: kv[1][1]):
        by_layer.setdefault(layer, []).append(tree[path])
    def stack(*xs):
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in xs):  # shapes only (lorm_jax.aot)
            shape = list(xs[0].shape)
            return jax.ShapeDtypeStruct(tuple(shape[:axis] + [len(xs)] + shape[axis:]), xs[0].dtype)
        return np.stack(xs, axis) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs, axis)
    return {layer: jax.tree.map(stack, *values) for layer, values in by_layer.items()}


def by_layer(blocks: Mapping[str, Any], axis: int = 0) -> dict:
    """:func:`by_kind` undone: ``{layer kind: x}`` with the block axis at ``axis`` -> ``{path: x[block]}`` (sorted
    paths; numpy leaves: views, no copy)."""
    out = {block_path(i, layer): jax.tree.map(lambda x, i=i: x[(slice(None),) * axis + (i,)], x)
           for layer, x in blocks.items() for i in range(jax.tree.leaves(x)[0].shape[axis])}
    return dict(sorted(out.items()))


def lora_collection(blocks: Mapping[str, Any]) -> dict:
    """LoRA factors in the block layout ``{layer kind: {"A": [depth, ...], "B": [depth, ...]}}`` as the scanned
    blocks' ``"lora"`` collection ``{"blocks": {layer nesting: {"A", "B"}}}`` (what :meth:`Backbone.apply` and
    :meth:`Backbone.stack_lora` use); :func:`lora_by_kind` is the inverse."""
    return {BLOCKS: traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in blocks.items()})}


def lora_by_kind(collection: Mapping[str, Any]) -> dict:
    """:func:`lora_collection` undone."""
    out: dict[str, dict] = {}
    for key, x in traverse_util.flatten_dict(collection[BLOCKS]).items():
        out.setdefault("/".join(key[:-1]), {})[key[-1]] = x
    return out


def stack_blocks(params: dict) -> dict:
    """Per-block params ``{"block_00": …, "block_01": …, …}`` (what the weight converters build) -> the scanned
    layout ``{"blocks": …}`` with every leaf stacked over blocks in order; other entries unchanged."""
    names = sorted(k for k in params if k.startswith("block_"))
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out[BLOCKS] = jax.tree.map(lambda *xs: np.stack(xs), *[params[k] for k in names])
    return out


def add_delta(params, deltas, lora_shapes):
    """``kernel ← kernel + ΔWᵀ`` for each ``path -> ΔW [d_out, d_in]`` in ``deltas`` (any subset of the layers), in
    the block-stacked kernels: one scatter-add per layer kind."""
    unknown = sorted(set(deltas) - set(lora_shapes))
    if unknown:
        raise ValueError(f"add_delta: unknown layer paths {unknown}; valid paths are the keys of lora_shapes")
    where = _block_layers(lora_shapes)
    by_layer: dict[str, list] = {}
    for path, dw in deltas.items():
        if tuple(dw.shape) != tuple(lora_shapes[path]):
            raise ValueError(f"add_delta: ΔW for {path!r} has shape {dw.shape}, expected [d_out, d_in] = "
                             f"{lora_shapes[path]}")
        layer, block = where[path]
        by_layer.setdefault(layer, []).append((block, dw))
    flat = traverse_util.flatten_dict(params)
    for layer, items in by_layer.items():
        key = (BLOCKS, *layer.split("/"), "kernel")
        blocks = jnp.asarray([b for b, _ in items])
        update = jnp.stack([jnp.swapaxes(dw, -1, -2) for _, dw in items]).astype(flat[key].dtype)
        flat[key] = flat[key].at[blocks].add(update)
    return traverse_util.unflatten_dict(flat)


def add_block_deltas(params, deltas):
    """``kernel ← kernel + ΔWᵀ`` on every block of each layer kind in ``deltas = {layer kind: ΔW [depth, d_out,
    d_in]}`` (the block layout, :func:`by_kind`): one dense add per kind. :func:`add_delta` is the per-layer form,
    for any subset of the layers."""
    flat = traverse_util.flatten_dict(params)
    for layer, dw in deltas.items():
        kernel = (BLOCKS, *layer.split("/"), "kernel")  # [depth, d_in, d_out]
        flat[kernel] = flat[kernel] + jnp.swapaxes(dw, -1, -2).astype(flat[kernel].dtype)
    return traverse_util.unflatten_dict(flat)


def lora_shapes_of(params) -> dict[str, tuple[int, int]]:
    """``{path: (d_out, d_in)}`` of every dense kernel of the scanned blocks (``[depth, d_in, d_out]``), one path per
    block and layer, sorted by path (= depth order)."""
    flat = traverse_util.flatten_dict(params[BLOCKS])
    shapes = {block_path(i, "/".join(k[:-1])): (int(v.shape[2]), int(v.shape[1])) for k, v in flat.items()
              if k[-1] == "kernel" and v.ndim == 3 for i in range(v.shape[0])}
    return dict(sorted(shapes.items()))


# ----------------------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale"], meta_fields=["fn"])
@dataclasses.dataclass(frozen=True)
class BlockSums:
    """Per-block reduction of a packed batch's layer Grams (the module doc): every LoRA layer yields
    ``(fn({"A": [G, r, d_in], "B": [G, d_out, r]}, grams [G, d_in(, d_in)]), finite [G])`` with its per-block
    factors as given (unscaled) and its forward pass using ``B · scale``. ``fn`` is static (hashable)."""
    fn: Callable
    scale: jax.Array


class GramSpec(NamedTuple):
    """What a LoRA layer records: ``mode`` ("diag" / "full"), the row weights ``row_w [B, T]`` (None = all 1) and
    optionally ``segments``: ``(ids [G], K)`` for per-client sums over G equal blocks of examples, or
    :class:`BlockSums` (see the module doc)."""
    mode: str
    row_w: jax.Array | None
    segments: tuple | BlockSums | None = None


def layer_gram(x, spec: GramSpec):
    """Gram of a layer input ``x [..., d]`` over all rows: ``Σ w x²`` ("diag") or ``Σ w x xᵀ`` ("full"), in float32
    (float64 for float64 inputs); with ``spec.segments = (ids, K)`` one per client, ``[K, d]`` / ``[K, d, d]``.

    All are dots (precision HIGHEST) rather than reductions, so the result does not depend on XLA's fusion choices
    (see :class:`LayerNorm`); "diag" is the vector-matrix product ``w @ (x ⊙ x)`` and never forms a d×d matrix.
    Segmented: one Gram per block (:func:`block_grams`), then a segment sum over blocks.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.reshape(-1, x.shape[-1]).astype(acc)
    w = jnp.ones((x.shape[0],), acc) if spec.row_w is None else spec.row_w.reshape(-1).astype(acc)
    if spec.segments is None:
        if spec.mode == "diag":
            return jnp.matmul(w, x * x, precision=HIGHEST)
        return jnp.matmul((x * w[:, None]).T, x, precision=HIGHEST)
    ids, num = spec.segments
    return jax.ops.segment_sum(block_grams(x, spec, ids.shape[0]), ids, num_segments=num)


def block_grams(x, spec: GramSpec, num_blocks: int):
    """One Gram per block of rows: ``x [..., d]`` (``num_blocks`` equal contiguous blocks) → ``[G, d]`` ("diag") or
    ``[G, d, d]`` ("full"), batched dots over each block's rows (float32, float64 for float64 inputs)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.reshape(-1, x.shape[-1]).astype(acc)
    w = jnp.ones((x.shape[0],), acc) if spec.row_w is None else spec.row_w.reshape(-1).astype(acc)
    xb, wb = x.reshape(num_blocks, -1, x.shape[-1]), w.reshape(num_blocks, -1)  # [G, rows per block, d]
    if spec.mode == "diag":
        return jnp.einsum("gn,gnd->gd", wb, xb * xb, precision=HIGHEST)
    return jnp.einsum("gnd,gne->gde", xb * wb[..., None], xb, precision=HIGHEST)


def dot(x, w, dtype):
    """``x @ w`` (batched over leading axes) computed in ``dtype`` with a float32 result (float64 for float64)."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.promote_types(dtype, jnp.float32))


class LoRADense(nn.Module):
    """``y = x @ kernel + b + (x @ Aᵀ) @ Bᵀ``; x: [..., d_in] -> y: float32 [..., features].

    ``A``/``B`` are read from the ``"lora"`` collection when present (plain dense layer otherwise); per-block factors
    ``A [G, r, d_in]``, ``B [G, d_out, r]`` apply to G equal contiguous blocks of the rows (examples). With a GramSpec
    the layer also sows the Gram of its input ``x`` into the ``"grams"`` collection (with :class:`BlockSums`: the
    reduction of its per-block Grams and their finiteness).
    """
    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x, spec: GramSpec | None = None):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # 2-D dots: XLA:CPU runs the backward of [B, T, d] dots ~3x slower
        y = dot(x, kernel, self.dtype) + bias
        reduce = spec.segments if spec is not None and isinstance(spec.segments, BlockSums) else None
        if self.has_variable("lora", "A"):
            a, b = self.get_variable("lora", "A"), self.get_variable("lora", "B")
            b_fwd = b if reduce is None else b * reduce.scale
            if a.ndim == 2:
                y = y + dot(dot(x, a.T, self.dtype), b_fwd.T, self.dtype)
            else:  # per block: [G, rows/G, d_in] @ [G, d_in, r] @ [G, r, d_out]
                xb = x.reshape(a.shape[0], -1, x.shape[-1])
                y = y + dot(dot(xb, a.swapaxes(-1, -2), self.dtype), b_fwd.swapaxes(-1, -2),
                            self.dtype).reshape(y.shape)
        elif reduce is not None:
            raise ValueError("BlockSums needs per-block LoRA factors (the reduction uses each block's own)")
        if reduce is not None:
            grams = block_grams(x, spec, a.shape[0])
            finite = jnp.all(jnp.isfinite(grams.reshape(grams.shape[0], -1)), axis=1)
            self.sow("grams", "gram", (reduce.fn({"A": a, "B": b}, grams), finite), init_fn=lambda: None,
                     reduce_fn=lambda acc, g: g)
        elif spec is not None:
            self.sow("grams", "gram", layer_gram(x, spec), init_fn=lambda: 0.0, reduce_fn=lambda acc, g: acc + g)
        return y.reshape(*lead, self.features)


class SelfAttention(nn.Module):
    """Multi-head self-attention with LoRA on q, k, v (fused ``qkv`` [d, 3d] or separate ``q``/``k``/``v``) and ``out``.

    ``softmax(q kᵀ / √d_head + mask) v`` per head; x: [B, T, d], mask: optional [B, T] (1 = attend to this key).
    The fused kernel's columns are ``[q heads | k heads | v heads]`` (the timm / reference ``qkv`` layout).
    """
    heads: int
    qkv: str = "fused"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, spec: GramSpec | None = None):
        b, t, d = x.shape
        hd = d // self.heads
        if self.qkv == "fused":
            q, k, v = jnp.split(LoRADense(3 * d, self.dtype, name="qkv")(x, spec), 3, axis=-1)
        else:
            q, k, v = (LoRADense(d, self.dtype, name=n)(x, spec) for n in ("q", "k", "v"))
        q, k, v = (z.reshape(b, t, self.heads, hd).astype(self.dtype) for z in (q, k, v))
        acc = jnp.promote_types(self.dtype, jnp.float32)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=acc) / math.sqrt(hd)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bhqk,bkhc->bqhc", probs, v, preferred_element_type=acc).reshape(b, t, d)
        return LoRADense(d, self.dtype, name="out")(o, spec)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with exact (erf) GELU; x: [..., d] -> [..., d]."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, spec: GramSpec | None = None):
        h = nn.gelu(LoRADense(self.hidden, self.dtype, name="fc1")(x, spec), approximate=False)
        return LoRADense(x.shape[-1], self.dtype, name="fc2")(h, spec)


class LayerNorm(nn.Module):
    """``y = (x − μ) / √(σ² + ε) ⊙ scale + bias`` over the last axis (two-pass variance, as torch).

    μ and σ² are matrix-vector products with a ones vector (precision HIGHEST) rather than ``reduce`` ops: XLA then
    materialises ``x`` before taking the statistics, so they cannot depend on what was fused into ``x``. Without this,
    XLA:CPU compiles ``mean(h + W x + b)`` and ``mean(h + W x + b + 0)`` to differently ordered sums and a LoRA model
    with ``B = 0`` would differ from the plain model in the last bit.
    """
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        ones = jnp.ones((d,), x.dtype)
        mu = jnp.matmul(x, ones, precision=HIGHEST)[..., None] / d
        xc = x - mu
        var = jnp.matmul(xc * xc, ones, precision=HIGHEST)[..., None] / d
        return xc * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def layer_norm(eps, name):
    return LayerNorm(epsilon=eps, name=name)


def scan_blocks(block: type[nn.Module], depth: int, broadcast_args: int):
    """``block`` (a module whose ``__call__(x, *args)`` returns ``(x, None)``) as one ``nn.scan`` over ``depth``
    blocks: params, LoRA factors and sown Grams stacked on a leading block axis; the ``broadcast_args`` arguments after
    ``x`` (mask, Gram spec) are the same for every block."""
    return nn.scan(block, variable_axes={"params": 0, "lora": 0, "grams": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * broadcast_args, length=depth)


# ----------------------------------------------------------------------------------------------------------------------
# Building helpers used by the loaders.
# ----------------------------------------------------------------------------------------------------------------------

def fuse_qkv(params: dict) -> dict:
    """Separate ``attn/{q,k,v}`` dense params -> one fused ``attn/qkv`` (kernel [d, 3d] = [Wqᵀ | Wkᵀ | Wvᵀ])."""
    out = {}
    for top, sub in params.items():
        if top.startswith("block_") and "attn" in sub and "q" in sub["attn"]:
            attn = dict(sub["attn"])
            q, k, v = attn.pop("q"), attn.pop("k"), attn.pop("v")
            attn["qkv"] = {n: np.concatenate([q[n], k[n], v[n]], axis=-1) for n in ("kernel", "bias")}
            sub = {**sub, "attn": attn}
        out[top] = sub
    return out


def check_options(qkv, compute_dtype):
    if qkv not in QKV_MODES:
        raise ValueError(f"qkv must be one of {QKV_MODES}, got {qkv!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if compute_dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("compute_dtype = 'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or jax_enable_x64) first")
    return COMPUTE_DTYPES[compute_dtype]


def finalize_params(module, params_np, example_inputs):
    """float32 jnp params, checked leaf by leaf against the shapes the module itself would create."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params_np)
    want = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), example_inputs))["params"]
    got_flat, want_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(want)
    if set(got_flat) != set(want_flat):
        raise ValueError(f"converted weights do not match the module: missing "
                         f"{sorted('/'.join(k) for k in set(want_flat) - set(got_flat))[:6]}, unexpected "
                         f"{sorted('/'.join(k) for k in set(got_flat) - set(want_flat))[:6]}")
    for k, w in want_flat.items():
        if got_flat[k].shape != w.shape:
            raise ValueError(f"converted weight {'/'.join(k)} has shape {got_flat[k].shape}, module expects {w.shape}")
    return params

