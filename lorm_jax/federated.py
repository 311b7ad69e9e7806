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

HIGHEST = jax.lax.Precision.HIGHEST


def head_logits(head: dict, features: jax.Array) -> jax.Array:
    """``f Wᵀ + b``: features [B, F] → logits [B, C]."""
    return jnp.matmul(features, head["w"].T, precision=HIGHEST) + head["b"]


def init_head(key: jax.Array, num_classes: int, feature_dim: int) -> dict:
    """A fresh linear head as timm re-initialises it: W ~ trunc_normal(std=0.02) (cut at ±2σ), b = 0."""
    w = 0.02 * jax.random.truncated_normal(key, -2.0, 2.0, (num_classes, feature_dim), jnp.float32)
    return {"w": w, "b": jnp.zeros((num_classes,), jnp.float32)}


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


def build_client_functions(backbone, prepare: Callable, *, lr_head: float, weight_decay: float,
                           backbone_gram: str, alpha_backbone: float, head_gram: str, alpha_head: float,
                           augment_grams: bool = True) -> ClientFunctions:
    """Compile-once client programs for a backbone.

    ``prepare(data, idx [B], key, train: bool) -> model inputs`` gathers a batch from the task's device arrays and
    applies on-device augmentation (train) or the test transform. ``backbone_gram`` / ``head_gram`` are "diag" or
    "full"; full Grams are shrunk ``α G + (1 − α) diag(G)`` on the client, as the reference does.
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

    train = jax.jit(jax.vmap(local_train, in_axes=(None, None, None, None, 0, 0, 0, None, None, None)))
    grams = jax.jit(jax.vmap(local_grams, in_axes=(None, None, 0, 0, 0, 0, None)))
    return ClientFunctions(train=train, grams=grams, evaluate=jax.jit(evaluate))


def _zero_grams(backbone, backbone_gram: str, head_gram: str):
    def zeros(d):
        return jnp.zeros((d,) if backbone_gram == "diag" else (d, d), jnp.float32)
    f = backbone.feature_dim
    hg = jnp.zeros((f,) if head_gram == "diag" else (f, f), jnp.float32)
    return {p: zeros(d_in) for p, (_, d_in) in backbone.lora_shapes.items()}, hg


def run_chunked(fn: Callable, per_client: tuple, shared_before: tuple, shared_after: tuple, chunk: int) -> Any:
    """Call a vmapped client function on slices of at most ``chunk`` clients and concatenate the outputs.

    ``fn(*shared_before, *per_client_slice, *shared_after)``; ``chunk <= 0`` means all clients at once. Each client's
    computation depends only on its own inputs and keys, so the result does not depend on the chunk size.
    """
    num = jax.tree.leaves(per_client)[0].shape[0]
    if chunk <= 0 or chunk >= num:
        return fn(*shared_before, *per_client, *shared_after)
    outs = [fn(*shared_before, *jax.tree.map(lambda x: x[i:i + chunk], per_client), *shared_after)
            for i in range(0, num, chunk)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def stack_clients(tree, num_clients: int):
    """Broadcast an unstacked pytree to a leading client axis of size K."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)
