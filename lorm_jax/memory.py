"""The memory plan: bytes of a training lane and of the packed Gram pass, how many lanes fit on a device, and how many
lanes are worth running (:func:`choose_lanes`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import sharding


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes of one training lane and of the packed Gram pass, and the lanes they allow on each device."""
    lora_bytes: int          # trainable LoRA factors + head of one client
    optimizer_bytes: int     # AdamW moments, gradients, updates and the step's select copies (≈ 5× the params)
    activation_bytes: int    # one local step at the training batch: every forward intermediate (an upper bound)
    gram_full_bytes: int     # Gram sums of one client with full [d, d] Grams (every LoRA layer + head)
    gram_diag_bytes: int     # … with diagonal [d] Grams
    gram_bytes: int          # … in the configured layout
    lane_bytes: int          # one training lane: its clients' rows (params + AdamW moments), activations
    gram_pass_bytes: int     # the packed Gram pass: K clients' Gram sums (accumulator + update) + one batch
    shared_bytes: int        # replicated on every device: backbone params + task data
    budget_bytes: int        # usable bytes per device
    devices: int
    num_clients: int
    max_lanes: int           # lanes that fit (all devices together, a multiple of the mesh size)

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:10.2f} MiB"
        rows = [("LoRA + head", self.lora_bytes), ("optimizer state + grads", self.optimizer_bytes),
                ("activations per batch", self.activation_bytes), ("Grams (full)", self.gram_full_bytes),
                ("Grams (diagonal)", self.gram_diag_bytes), ("per training lane", self.lane_bytes),
                ("packed Gram pass", self.gram_pass_bytes), ("shared per device", self.shared_bytes),
                ("budget per device", self.budget_bytes)]
        lines = [f"  {name:<24}{mb(b)}" for name, b in rows]
        lines.append(f"  -> at most {self.max_lanes} training lanes over {self.devices} device(s) "
                     f"for K = {self.num_clients} clients")
        if self.gram_pass_bytes + self.shared_bytes > self.budget_bytes:
            lines.append("  !! the packed Gram pass alone exceeds the budget: use diagonal Grams "
                         "(config.alpha_backbone = 0) or fewer clients")
        return "memory plan:\n" + "\n".join(lines)


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
    jaxpr = jax.make_jaxpr(lambda p, lo, x: backbone.apply(p, lo, x)[0])(backbone.params, lora, inputs)
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
    """Bytes of a training lane and of the packed Gram pass, and the most lanes (a multiple of the mesh size) that fit
    ``budget_bytes`` per device (default :func:`device_budget`) after ``shared_bytes`` and the Gram pass."""
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
    lane = optimizer + act_train + num_clients * 3 * params  # every client's row: parameters and AdamW's 2 moments
    gram_pass = 2 * num_clients * grams + act_gram
    budget = device_budget(list(mesh.devices.flat)) if budget_bytes is None else int(budget_bytes)
    per_device = max(1, (budget - shared_bytes) // lane)
    return MemoryPlan(lora_bytes=params, optimizer_bytes=optimizer, activation_bytes=act_train,
                      gram_full_bytes=full, gram_diag_bytes=diag, gram_bytes=grams, lane_bytes=lane,
                      gram_pass_bytes=gram_pass, shared_bytes=int(shared_bytes), budget_bytes=budget, devices=devices,
                      num_clients=num_clients, max_lanes=per_device * devices)


def choose_lanes(steps_per_task, *, devices: int, platform: str, max_lanes: int, requested: int = 0) -> int:
    """Lanes P for a run whose tasks have client step counts ``steps_per_task`` ([K] arrays), a multiple of
    ``devices``: ``requested`` (``config.client_lanes``) when > 0, else automatic.

    A round lasts about ``max(S_max, ΣS/P)`` steps of P vmapped lanes. On an accelerator a step of P lanes costs about
    what one lane's does until the chip is full, so P = ⌈ΣS / S_max⌉ (the fewest lanes whose longest is the largest
    client; more only add idle lanes), worst task of the run, capped by memory (``max_lanes``). On a CPU a batch
    already fills the cores and P lanes cost P times one, so one lane per device: no lane ever idles.
    """
    if requested:
        if requested % devices:
            raise ValueError(f"config.client_lanes = {requested} is invalid: a multiple of the {devices} devices of "
                             f"the mesh (or 0 = automatic)")
        return requested
    if platform == "cpu":
        want = 1
    else:
        want = max((-(-int(np.sum(s)) // max(int(np.max(s)), 1)) for s in steps_per_task if len(s)), default=1)
        num_clients = max(len(s) for s in steps_per_task)
        want = -(-min(want, num_clients) // devices)
    per_device = max(1, min(want, max_lanes // devices))
    return per_device * devices
