"""The memory plan: bytes of a round's parts, how many clients a wave may hold and how it sums their Grams, how many
lanes fit on a device, and how many lanes are worth running (:func:`choose_lanes`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import sharding


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per device of a round's parts, and the waves and lanes they allow.

    A round trains its clients in **waves** of at most ``wave_clients`` (:func:`lorm_jax.plan.split_waves`): a wave
    trains (a row of parameters and AdamW moments per client), then its Gram pass turns its clients' outputs into the
    sums the merge needs, added to the round's; only the sums outlive the wave. Per client a wave holds its row, its
    outputs and its head Gram, and with ``gram_units = "clients"`` its LoRA layers' Grams (summed per client, then
    contracted, as the merge did before streaming); with ``"blocks"`` every layer contracts per block of examples and
    no per-client Gram of a LoRA layer exists. Per-client Grams are kept when one wave takes the whole round, so runs
    that fit compute exactly as before; otherwise blocks, and waves as large as ``wave_budget_bytes`` allows.
    """
    lora_bytes: int          # trainable LoRA factors + head of one client
    optimizer_bytes: int     # AdamW moments, gradients, updates and the step's select copies of a step's slots
    activation_bytes: int    # one local step at the training batch: every forward intermediate (an upper bound)
    gram_full_bytes: int     # Gram sums of one client with full [d, d] Grams (every LoRA layer + head)
    gram_diag_bytes: int     # … with diagonal [d] Grams
    gram_bytes: int          # … in the configured layout
    client_bytes: int        # one client of a wave: row, outputs, head Gram (+ LoRA layers' Grams with "clients")
    sums_bytes: int          # the round's sums (every layer's Σ G, the merge's systems, the diagnostics' sums)
    block_bytes: int         # "blocks": the block Grams of the largest layer for one packed Gram batch
    lane_bytes: int          # one training lane besides its clients' rows: a step's activations and slot states
    shared_bytes: int        # replicated on every device: backbone params + task data
    budget_bytes: int        # usable bytes per device
    wave_budget_bytes: int   # what a wave's clients may take: the rest of the budget (on a CPU at most WAVE_BYTES)
    devices: int
    num_clients: int         # clients of a round
    wave_clients: int        # most clients of a wave
    gram_units: str          # "clients" | "blocks"
    max_lanes: int           # lanes that fit (all devices together, a multiple of the mesh size)
    floor_bytes: int = 0     # the least budget that runs: a wave of one client (less is refused before compiling)

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:10.2f} MiB"
        rows = [("LoRA + head", self.lora_bytes), ("optimizer state + grads", self.optimizer_bytes),
                ("activations per batch", self.activation_bytes), ("Grams (full)", self.gram_full_bytes),
                ("Grams (diagonal)", self.gram_diag_bytes), ("per client of a wave", self.client_bytes),
                ("round sums", self.sums_bytes), ("block Grams per batch", self.block_bytes),
                ("per training lane", self.lane_bytes), ("shared per device", self.shared_bytes),
                ("budget per device", self.budget_bytes), ("budget of a wave", self.wave_budget_bytes)]
        lines = [f"  {name:<24}{mb(b)}" for name, b in rows]
        waves = -(-self.num_clients // self.wave_clients)
        lines.append(f"  -> {waves} wave(s) of at most {self.wave_clients} of the round's {self.num_clients} "
                     f"clients, Gram sums per {'client' if self.gram_units == 'clients' else 'block of examples'}; "
                     f"at most {self.max_lanes} training lanes over {self.devices} device(s)")
        return "memory plan:\n" + "\n".join(lines)


# On a CPU a wave's clients take at most this much: a lane step packs at most M clients, so a wave of a few hundred
# clients already fills its lane, and a fixed cap keeps a run's memory flat in K. Accelerators use the whole budget
# (larger waves feed more parallel lanes).
WAVE_BYTES = 512 * 2 ** 20
GRAM_UNITS = ("clients", "blocks")
# One layer's block Grams of a packed Gram batch take at most this much (full Grams): a layer forms, shrinks and
# contracts them at once, so the batch's temporaries scale with it; more, smaller batches cost the same FLOPs.
GRAM_BLOCK_BYTES = 64 * 2 ** 20


def gram_blocks_per_batch(backbone, gram_batch_size: int, block: int, mode: str) -> int:
    """Client-pure blocks of ``block`` examples in one packed Gram batch: ``gram_batch_size / block``, and with full
    Grams at most as many as keep the widest layer's block Grams ``[G, d, d]`` within :data:`GRAM_BLOCK_BYTES`
    (DINOv2-S/14: d = 1536, 9.4 MB a block, 7 blocks)."""
    widest = max(d_in for _, d_in in backbone.lora_shapes.values())
    per_block = 4 * (widest * widest if mode == "full" else widest)
    return max(1, min(gram_batch_size // max(block, 1), GRAM_BLOCK_BYTES // per_block))


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
                max_len: int = 32, gram_block: int = 1, residuals: bool = True, wave_clients: int = 0,
                gram_units: str = "") -> MemoryPlan:
    """The waves and lanes of a round of ``num_clients`` clients that fit ``budget_bytes`` per device (default
    :func:`device_budget`) after ``shared_bytes`` (see :class:`MemoryPlan`). ``wave_clients`` / ``gram_units`` (0 /
    "": automatic) fix them instead. Raises :class:`lorm_jax.config.InputError` (one line: what it needs, what fits)
    when not even a wave of one client fits: a run is refused before anything is compiled, never killed mid-way."""
    from lorm_jax import config as config_lib
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    devices = sharding.mesh_size(mesh)
    f = backbone.feature_dim
    layers = backbone.lora_shapes.values()
    lora = sum(rank * (d_in + d_out) for d_out, d_in in layers)
    params = 4 * (lora + num_classes * (f + 1))
    diag = 4 * (sum(d_in for _, d_in in layers) + f)
    full = 4 * (sum(d_in * d_in for _, d_in in layers) + f * f)
    head = 4 * (f * f if head_gram == "full" else f)
    grams = (full - 4 * f * f if backbone_gram == "full" else diag - 4 * f) + head
    act_train = activation_bytes(backbone, rank, batch_size, max_len)
    act_gram = act_train if gram_batch_size == batch_size else activation_bytes(backbone, rank, gram_batch_size,
                                                                                max_len)
    optimizer = 5 * params * min(batch_size, max(num_clients, 1))  # a step's slots: moments, grads, updates, selects

    def sums(mode: str) -> int:  # Σ G, the merge's systems (at most a dense ΔW sum) and the residual sums, per layer
        per_layer = sum((d_in if mode == "diag" else d_in * d_in) + d_out * d_in * (1 + residuals) + rank * d_in
                        for d_out, d_in in layers)
        return 4 * 4 * (per_layer + f * f + num_classes * f)  # ×4: a pass's accumulator and update, wave, round

    blocks = gram_blocks_per_batch(backbone, gram_batch_size, gram_block, backbone_gram)
    widest = max(d_in for _, d_in in layers)
    block_of = lambda mode: 4 * 2 * blocks * (widest * widest if mode == "full" else widest)  # noqa: E731
    block = block_of(backbone_gram)
    per_client = {"blocks": 6 * params + 3 * head, "clients": 6 * params + 3 * grams}
    fixed = shared_bytes + act_train + act_gram + optimizer + sums(backbone_gram)
    floor = lambda mode: fixed - sums(backbone_gram) + sums(mode) + block_of(mode) + per_client["blocks"]  # noqa: E731
    budget = device_budget(list(mesh.devices.flat)) if budget_bytes is None else int(budget_bytes)
    free = budget - fixed - block
    if budget < floor(backbone_gram):  # not even a wave of one client: refuse now, before anything compiles
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        hint = ""
        if backbone_gram == "full":
            verdict = "fits" if budget >= floor("diag") else "does not fit either"
            hint = f"; with diagonal Grams (config.alpha_backbone = 0) it {verdict} ({gib(floor('diag'))})"
        raise config_lib.InputError(
            f"the run does not fit the memory plan: {gib(floor(backbone_gram))} per device (backbone and data "
            f"{gib(shared_bytes)}, the round's Gram sums {gib(sums(backbone_gram))}, one batch's activations and "
            f"block Grams {gib(act_train + act_gram + block)}, one client {gib(per_client['blocks'])}) but the budget "
            f"is {gib(budget)}{hint}; or lower config.batch_size / config.gram_batch_size, config.merge_diagnostics = "
            f"False, or use a device with more memory")
    platform = mesh.devices.flat[0].platform
    wave_budget = free if platform != "cpu" else min(free, WAVE_BYTES)
    fit = {u: max(1, wave_budget // b) for u, b in per_client.items()}
    if gram_units and gram_units not in GRAM_UNITS:
        raise ValueError(f"gram_units must be one of {GRAM_UNITS}, got {gram_units!r}")
    if wave_clients:
        units = gram_units or ("clients" if wave_clients >= num_clients and fit["clients"] >= num_clients
                               else "blocks")
        wave = min(wave_clients, num_clients)
    else:
        units = gram_units or ("clients" if fit["clients"] >= num_clients else "blocks")
        wave = max(1, min(num_clients, fit[units]))
    lane = optimizer + act_train
    per_device = max(1, (free - wave * per_client[units]) // max(lane, 1))
    return MemoryPlan(lora_bytes=params, optimizer_bytes=optimizer, activation_bytes=act_train,
                      gram_full_bytes=full, gram_diag_bytes=diag, gram_bytes=grams, client_bytes=per_client[units],
                      sums_bytes=sums(backbone_gram), block_bytes=block if units == "blocks" else 0, lane_bytes=lane,
                      shared_bytes=int(shared_bytes), budget_bytes=budget, wave_budget_bytes=int(wave_budget),
                      devices=devices, num_clients=num_clients, wave_clients=int(wave), gram_units=units,
                      max_lanes=per_device * devices, floor_bytes=floor(backbone_gram))


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
