"""One federated round for K clients in parallel: ``vmap`` over clients of a ``lax.scan`` over local steps.

Ragged clients share one compiled program: every client's schedule is padded to the same number of steps ``S`` with a
mask ``[K, S, batch]``. A step whose mask is all-False changes nothing (parameters, optimizer state, Gram sums, loss
averages), so a client padded to more steps ends exactly where it would have ended unpadded.

Shapes used throughout::

    idx, mask   [K, S, batch]     int32 / bool: example indices into the task's data and which are real
    keys        [K]               one PRNG key per client (fold_in chain of seed, task, round, client)
    lora        {path: {"A": [r, d_in], "B": [d_out, r]}}     (client-stacked: leading K)
    head        {"w": [C, F], "b": [C]}                       (paper layout: logits = f Wᵀ + b)
    grams       {path: [d_in] or [d_in, d_in]}, head Gram [F] or [F, F]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorm_jax import lora as lora_lib
from lorm_jax import merging
from lorm_jax import sharding

HIGHEST = jax.lax.Precision.HIGHEST


def head_logits(head: dict, features: jax.Array) -> jax.Array:
    """``f Wᵀ + b``: features [B, F] → logits [B, C]."""
    return jnp.matmul(features, head["w"].T, precision=HIGHEST) + head["b"]


HEAD_INITS = ("trunc_2sigma", "reference")


def init_head(key: jax.Array, num_classes: int, feature_dim: int, kind: str = "trunc_2sigma") -> dict:
    """A fresh linear head ``{"w": [C, F], "b": [C]}``: ``W = 0.02·z``, ``b = 0``, with ``z`` drawn by ``kind``.

    * ``trunc_2sigma`` (default, kept so earlier results reproduce): ``z`` a standard normal truncated to ±2, so
      ``|W| ≤ 0.04`` and ``std(W) = 0.8796·0.02 ≈ 0.0176``. This is *not* timm's init.
    * ``reference``: what the reference gets from timm's ``trunc_normal_(std=0.02)``, whose cut ``a = -2, b = 2`` is
      in absolute units (timm/layers/weight_init.py), i.e. at ±100σ: ``z ~ N(0, 1)``. A float32 normal draw never
      reaches that cut (|z| < 5.5), so none is applied.
    """
    shape = (num_classes, feature_dim)
    if kind == "trunc_2sigma":
        z = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    elif kind == "reference":
        z = jax.random.normal(key, shape, jnp.float32)
    else:
        raise ValueError(f"head init {kind!r} is invalid: one of {list(HEAD_INITS)}")
    return {"w": 0.02 * z, "b": jnp.zeros((num_classes,), jnp.float32)}


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array, weights: jax.Array):
    """Mean CE over real examples with logits outside ``class_mask`` [C] removed (the reference slices them away).

    Masked-out classes get exactly zero probability and gradient, so head rows of other tasks never move.
    """
    logits = jnp.where(class_mask, logits, -jnp.inf)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    nll = jnp.where(weights > 0, nll, 0.0)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(lr_factor, lr_head, weight_decay: float) -> optax.GradientTransformation:
    """AdamW with two parameter groups, as the reference builds it anew every round: {LoRA factor: lr_factor, head: lr_head}.

    ``lr_factor`` may be traced (it depends on which factor trains), so building this inside a jitted function never
    retraces when the phase flips.
    """
    def labels(params):
        return {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}

    return optax.multi_transform(
        {"lora": optax.adamw(lr_factor, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay),
         "head": optax.adamw(lr_head, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)},
        labels)


def _select(active, new, old):
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)


@dataclasses.dataclass(frozen=True)
class ClientFunctions:
    """The jitted, vmapped client-side programs of one experiment (built once by :func:`build_client_functions`)."""
    train: Callable      # (frozen, data, lora0, head0, idx, mask, keys, phase [2], lr_factor, class_mask) -> dict
    grams: Callable      # (gram_params, data, lora [K...], idx, mask, keys, lora_scale) -> (grams, head_grams, counts)
    evaluate: Callable   # (params, lora, head, data, idx [B], class_mask) -> (predictions [B], labels [B])
    mesh: Any = None     # the device mesh ``train`` / ``grams`` are shard_mapped over (lorm_jax.sharding)


def build_client_functions(backbone, prepare: Callable, *, lr_head: float, weight_decay: float,
                           backbone_gram: str, alpha_backbone: float, head_gram: str, alpha_head: float,
                           augment_grams: bool = True, mesh=None) -> ClientFunctions:
    """Compile-once client programs for a backbone.

    ``prepare(data, idx [B], key, train: bool) -> model inputs`` gathers a batch from the task's device arrays and
    applies on-device augmentation (train) or the test transform. ``backbone_gram`` / ``head_gram`` are "diag" or
    "full"; full Grams are shrunk ``α G + (1 − α) diag(G)`` on the client, as the reference does.

    ``train`` and ``grams`` are ``shard_map``-ed over ``mesh`` (default: a 1-device mesh): device i vmaps over its
    own block of the client axis, which must be a multiple of the mesh size (:func:`run_chunked` pads it).
    """

    def loss_fn(params, frozen, inputs, labels, weights, class_mask):
        features, _ = backbone.apply(frozen, params["lora"], inputs)
        return masked_cross_entropy(head_logits(params["head"], features), labels, class_mask, weights)

    def local_train(frozen, data, lora0, head0, idx, mask, key, phase, lr_factor, class_mask):
        """Local training of one client: ``lax.scan`` over its (padded) steps. Returns trained params and stats.

        ``phase`` [2] = (train A, train B) as 0/1 floats: which LoRA factors move (the head always trains).
        """
        params = {"lora": lora0, "head": head0}
        phase = lora_lib.phase_mask(lora0, phase[0], phase[1])
        tx = make_optimizer(lr_factor, lr_head, weight_decay)
        opt_state = tx.init(params)

        def step(carry, inp):
            params, opt_state = carry
            step_idx, step_mask, s = inp
            weights = step_mask.astype(jnp.float32)
            inputs, labels = prepare(data, step_idx, jax.random.fold_in(key, s), True)
            loss, grads = jax.value_and_grad(loss_fn)(params, frozen, inputs, labels, weights, class_mask)
            grads = {"lora": jax.tree.map(jnp.multiply, grads["lora"], phase), "head": grads["head"]}
            updates, new_opt_state = tx.update(grads, opt_state, params)
            updates = {"lora": jax.tree.map(jnp.multiply, updates["lora"], phase), "head": updates["head"]}
            new_params = optax.apply_updates(params, updates)
            active = jnp.any(step_mask)
            carry = (_select(active, new_params, params), _select(active, new_opt_state, opt_state))
            return carry, (jnp.where(active, loss, 0.0), active)

        steps = jnp.arange(idx.shape[0])
        (params, _), (losses, active) = jax.lax.scan(step, (params, opt_state), (idx, mask, steps))
        num_active = jnp.sum(active)
        return {"lora": params["lora"], "head": params["head"],
                "loss": jnp.sum(losses) / jnp.maximum(num_active, 1),
                "num_steps": num_active,
                "finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))}

    def local_grams(gram_params, data, lora_k, idx, mask, key, lora_scale):
        """Gram statistics of one client's layer inputs over its data (train augmentation, like the reference)."""
        scaled = None if lora_k is None else {p: {"A": f["A"], "B": f["B"] * lora_scale} for p, f in lora_k.items()}

        def step(acc, inp):
            step_idx, step_mask, s = inp
            weights = step_mask.astype(jnp.float32)
            inputs, _ = prepare(data, step_idx, jax.random.fold_in(key, s), augment_grams)
            features, grams = backbone.apply(gram_params, scaled, inputs, gram=backbone_gram, weights=weights)
            if head_gram == "diag":
                hg = jnp.einsum("bf,b->f", features * features, weights, precision=HIGHEST)
            else:
                hg = jnp.einsum("bf,bg,b->fg", features, features, weights, precision=HIGHEST)
            return jax.tree.map(jnp.add, acc, (grams, hg)), None

        zeros = _zero_grams(backbone, backbone_gram, head_gram)
        (grams, hg), _ = jax.lax.scan(step, zeros, (idx, mask, jnp.arange(idx.shape[0])))
        if backbone_gram == "full":
            grams = {p: merging.shrink_gram(g, alpha_backbone) for p, g in grams.items()}
        if head_gram == "full":
            hg = merging.shrink_gram(hg, alpha_head)
        return grams, hg, jnp.sum(mask)

    def evaluate(params, lora, head, data, idx, class_mask):
        inputs, labels = prepare(data, idx, jax.random.PRNGKey(0), False)
        features, _ = backbone.apply(params, lora, inputs)
        logits = jnp.where(class_mask, head_logits(head, features), -jnp.inf)
        return jnp.argmax(logits, axis=-1), labels

    mesh = sharding.make_mesh(1) if mesh is None else mesh
    c, r = jax.sharding.PartitionSpec(sharding.CLIENTS), jax.sharding.PartitionSpec()

    def per_device(fn, in_axes):
        """vmap over the local clients inside shard_map: no collective, the client axis stays sharded."""
        specs = tuple(r if a is None else c for a in in_axes)
        # check_vma off: the body has no collectives; replicated initial scan carries (the server LoRA, fresh
        # optimizer state) become per-client values, which the varying-manual-axes check would reject.
        return jax.jit(jax.shard_map(jax.vmap(fn, in_axes=in_axes), mesh=mesh, in_specs=specs, out_specs=c,
                                     check_vma=False))

    train = per_device(local_train, (None, None, None, None, 0, 0, 0, None, None, None))
    grams = per_device(local_grams, (None, None, 0, 0, 0, 0, None))
    return ClientFunctions(train=train, grams=grams, evaluate=jax.jit(evaluate), mesh=mesh)


def _zero_grams(backbone, backbone_gram: str, head_gram: str):
    def zeros(d):
        return jnp.zeros((d,) if backbone_gram == "diag" else (d, d), jnp.float32)
    f = backbone.feature_dim
    hg = jnp.zeros((f,) if head_gram == "diag" else (f, f), jnp.float32)
    return {p: zeros(d_in) for p, (_, d_in) in backbone.lora_shapes.items()}, hg


def chunk_layout(num: int, chunk: int, devices: int = 1) -> tuple[int, int]:
    """``(clients per call, padded K)`` for ``num`` clients, at most ``chunk`` per call (``<= 0``: all), ``devices`` on
    the mesh: the per-call size is a multiple of ``devices`` and the calls are balanced, so padding stays small
    (K = 100, chunk 32, 1 device → 4 calls of 25, no padding; K = 10 on 8 devices → 1 call of 16, 6 no-op
    clients)."""
    if chunk <= 0 or chunk >= num:
        cap = sharding.padded_size(num, devices)      # everything in one call
    else:
        cap = max(devices, chunk - chunk % devices)   # the largest multiple of the mesh size under the cap
    calls = -(-num // cap)
    per_call = sharding.padded_size(-(-num // calls), devices)
    return per_call, per_call * calls


def run_chunked(fn: Callable, per_client: tuple, shared_before: tuple, shared_after: tuple, chunk: int,
                mesh=None) -> Any:
    """Call a vmapped client function on groups of at most ``chunk`` clients and concatenate the outputs.

    ``fn(*shared_before, *per_client_slice, *shared_after)``; ``chunk <= 0`` means all clients at once. Each client's
    computation depends only on its own inputs and keys, so the result does not depend on the chunk size.

    With a ``mesh`` (``fn`` built by :func:`build_client_functions` on it), every group is a multiple of the mesh size
    and is placed sharded over ``clients`` (shared arguments replicated): the client axis is zero-padded with no-op
    clients (all-False masks) to a whole number of equal groups, one compiled shape, and the outputs are trimmed back
    to the ``K`` real clients. Without a mesh, the arguments are passed as they are.
    """
    num = jax.tree.leaves(per_client)[0].shape[0]
    devices = 1 if mesh is None else sharding.mesh_size(mesh)
    per_call, total = chunk_layout(num, chunk, devices)
    if mesh is not None:
        shared_before, shared_after = sharding.replicate((shared_before, shared_after), mesh)
    per_client = sharding.pad_clients(per_client, total)
    outs = []
    for i in range(0, total, per_call):
        part = per_client if per_call == total else jax.tree.map(lambda x: x[i:i + per_call], per_client)
        if mesh is not None:
            part = sharding.put_clients(part, mesh)
        outs.append(fn(*shared_before, *part, *shared_after))
    out = outs[0] if len(outs) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
    out = out if total == num else jax.tree.map(lambda x: x[:num], out)
    if mesh is not None and jax.process_count() > 1:
        # Multi-host: all-gather the (small) per-client outputs so host code on every process can read them; the
        # merge then runs replicated. On one host they stay sharded and the merge's client sums are all-reduces.
        out = sharding.replicate(out, mesh)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Memory planner: how many clients fit in one vmapped call

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes of one client in the vmapped programs, and the chunk size they allow on each device."""
    lora_bytes: int          # trainable LoRA factors + head of one client
    optimizer_bytes: int     # AdamW moments, gradients, updates and the step's select copies (≈ 5× the params)
    activation_bytes: int    # one local step at the training batch: every forward intermediate (an upper bound)
    gram_full_bytes: int     # Gram sums of one client with full [d, d] Grams (every LoRA layer + head)
    gram_diag_bytes: int     # … with diagonal [d] Grams
    gram_bytes: int          # … in the configured layout
    per_client_bytes: int    # max(training, Gram pass) per client
    shared_bytes: int        # replicated on every device: backbone params + task data
    budget_bytes: int        # usable bytes per device
    devices: int
    num_clients: int
    chunk: int               # clients per vmapped call (all devices together)

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:10.2f} MiB"
        rows = [("LoRA + head", self.lora_bytes), ("optimizer state + grads", self.optimizer_bytes),
                ("activations per batch", self.activation_bytes), ("Grams (full)", self.gram_full_bytes),
                ("Grams (diagonal)", self.gram_diag_bytes), ("per client (plan)", self.per_client_bytes),
                ("shared per device", self.shared_bytes), ("budget per device", self.budget_bytes)]
        lines = [f"  {name:<24}{mb(b)}" for name, b in rows]
        lines.append(f"  -> {self.chunk} clients per vmapped call over {self.devices} device(s), "
                     f"{-(-self.num_clients // self.chunk)} call(s) for K = {self.num_clients}")
        return "memory plan (bytes per client):\n" + "\n".join(lines)


def _jaxpr_bytes(jaxpr) -> int:
    """Σ bytes of every value a jaxpr (and its sub-jaxprs) produces: an upper bound on the live activations."""
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in eqn.outvars
                     if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            for q in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(q, jax.extend.core.ClosedJaxpr):
                    total += _jaxpr_bytes(q.jaxpr)
                elif isinstance(q, jax.extend.core.Jaxpr):
                    total += _jaxpr_bytes(q)
    return total


def activation_bytes(backbone, rank: int, batch: int, max_len: int = 32) -> int:
    """Bytes of every intermediate of one forward pass at ``batch`` (traced, not compiled: no device work).

    XLA fuses elementwise ops and frees what backward does not need, so this over-estimates (≈ 3× for ViTs); it is
    meant as a safe bound for the planner, not a measurement.
    """
    lora = {p: {"A": jax.ShapeDtypeStruct((rank, d_in), jnp.float32),
                "B": jax.ShapeDtypeStruct((d_out, rank), jnp.float32)}
            for p, (d_out, d_in) in backbone.lora_shapes.items()}
    if backbone.kind == "text":
        ids = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
        inputs = {"input_ids": ids, "attention_mask": ids}
    else:
        inputs = jax.ShapeDtypeStruct((batch, backbone.image_size, backbone.image_size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda lo, x: backbone.apply(backbone.params, lo, x)[0])(lora, inputs)
    return _jaxpr_bytes(jaxpr.jaxpr)


def device_budget(devices, fraction: float = 0.5) -> int:
    """``fraction`` of the free memory of one device: accelerator memory stats, or on CPU the available host RAM
    shared by the local CPU devices."""
    d = devices[0]
    stats = d.memory_stats() if d.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        import psutil
        free = psutil.virtual_memory().available // max(1, len([x for x in devices if x.process_index ==
                                                                 jax.process_index()]))
    return int(fraction * free)


def plan_memory(backbone, *, num_clients: int, num_classes: int, rank: int, batch_size: int, gram_batch_size: int,
                backbone_gram: str, head_gram: str, shared_bytes: int = 0, mesh=None, budget_bytes: int | None = None,
                max_len: int = 32) -> MemoryPlan:
    """Bytes per client of the training and Gram programs and the chunk size (clients per vmapped call, a multiple
    of the mesh size) that fits ``budget_bytes`` per device (default :func:`device_budget`) after ``shared_bytes``."""
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    devices = sharding.mesh_size(mesh)
    f = backbone.feature_dim
    lora = sum(rank * (d_in + d_out) for d_out, d_in in backbone.lora_shapes.values())
    params = 4 * (lora + num_classes * (f + 1))
    diag = 4 * (sum(d_in for _, d_in in backbone.lora_shapes.values()) + f)
    full = 4 * (sum(d_in * d_in for _, d_in in backbone.lora_shapes.values()) + f * f)
    grams = {("diag", "diag"): diag}.get((backbone_gram, head_gram))
    if grams is None:
        grams = (full if backbone_gram == "full" else diag - 4 * f) + 4 * (f * f if head_gram == "full" else f)
    act_train = activation_bytes(backbone, rank, batch_size, max_len)
    act_gram = act_train if gram_batch_size == batch_size else activation_bytes(backbone, rank, gram_batch_size,
                                                                                max_len)
    optimizer = 5 * params
    per_client = max(params + optimizer + act_train, params + 2 * grams + act_gram)
    budget = device_budget(list(mesh.devices.flat)) if budget_bytes is None else int(budget_bytes)
    per_device = max(1, (budget - shared_bytes) // per_client)
    chunk, _ = chunk_layout(num_clients, per_device * devices, devices)
    return MemoryPlan(lora_bytes=params, optimizer_bytes=optimizer, activation_bytes=act_train,
                      gram_full_bytes=full, gram_diag_bytes=diag, gram_bytes=grams, per_client_bytes=per_client,
                      shared_bytes=int(shared_bytes), budget_bytes=budget, devices=devices, num_clients=num_clients,
                      chunk=chunk)


def stack_clients(tree, num_clients: int):
    """Broadcast an unstacked pytree to a leading client axis of size K."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def numpy_tree(tree):
    """Host numpy copy of a pytree, on every process (global client-sharded arrays are all-gathered)."""
    return sharding.gather(tree)
