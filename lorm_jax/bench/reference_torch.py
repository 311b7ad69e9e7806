"""A timing model of the reference implementation's LoRM round in PyTorch (needs torch, an optional dependency).

The reference (aimagelab/fed-mammoth, ``models/lorm.py`` and its bases; behaviour summarised in LORM_SPEC.md §5, §6,
§10.6) runs one federated round as below, and so does :func:`reference_round`. This is our own code written from
that description, as a faithful *model of its loop* for side-by-side timing, not a copy:

clients, one after another (no parallelism across clients):
  1. a fresh AdamW (β = (0.9, 0.999), eps 1e-8, weight decay 0) over the trained factor of every LoRA layer (lr_factor)
     and the head (lr); both factors keep ``requires_grad`` (the reference sets it on both), only one is stepped;
  2. local training, ``epochs`` passes over the client's data in shuffled batches of 16: on-GPU augmentation of the
     stored images (random resized crop to 224 with bicubic resampling + horizontal flip, normalised with mean =
     std = 0.5); per step the forward weights are rebuilt as a copy of the frozen state dict with ``W0 + B A`` on
     every LoRA layer and the network runs through ``torch.func.functional_call``, under fp16 autocast with a
     GradScaler (Lightning Fabric "16-mixed", the reference's default); cross-entropy on the task's logits,
     backward, step, ``loss.item()`` (one host sync per step, as the reference returns it);
  3. Gram pass: ``eval()``, ``no_grad``, autocast, forward hooks on every LoRA linear layer and on the head cast the
     layer input to float32 and add the **dense** ``xᵀx`` (d_in × d_in over all tokens) on the GPU; afterwards the
     Grams move to the host where ``α G + (1 − α) I ⊙ G`` is applied (α = 0 for the backbone, so the dense matrices
     hold a diagonal; 0.5 for the head).
server (:func:`merge_layer`, :func:`merge_head`): per LoRA layer every client's Gram is moved to the GPU and cast to
float64; an A-round computes ``A = (Σ A_i G_i) pinverse(Σ G_i)``, a B-round ``B = (Σ B_i A G_i) Aᵀ pinverse(A Σ G_i
Aᵀ)``; the result goes back to float32. The head weight is ``(Σ W_i G_i) inverse(Σ G_i)`` in float64, its bias the
sample-weighted mean.

Not modelled, each of which makes this model *faster* than the reference (so a speed-up measured against it is a
lower bound): the CPU data loader (PIL decoding and ``Resize(224)`` in worker processes), moving the client's model
state to the host after its Gram pass and the full state-dict copy it uploads, per-round evaluation, logging (tqdm,
wandb), checkpoints. ``torch.set_float32_matmul_precision("medium")`` as the reference sets it.

The network is a pre-LN ViT with a CLS token and fused qkv (the layout of timm's ``vit_base_patch16_224``, whose
attention also uses ``scaled_dot_product_attention``), randomly initialised: weights do not change the timing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lorm_jax.bench import common

GRAM_ALPHA_BACKBONE = 0.0  # the paper's α for LoRA layers (diagonal Grams, sent as dense matrices)
GRAM_ALPHA_HEAD = 0.5


# ----------------------------------------------------------------------------------------------------------------------
# The network.

class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = Attention(width, heads), Mlp(width, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """images [B, 3, S, S] → logits [B, num_classes] (final-LayerNorm CLS token through a linear head)."""

    def __init__(self, *, image_size: int, patch: int, width: int, depth: int, heads: int, mlp: int,
                 num_classes: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (image_size // patch) ** 2, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def lora_modules(model: ViT) -> dict[str, nn.Linear]:
    """The reference's LoRA targets: every block's attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (state-dict prefix →
    module)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in
            ("qkv", "proj", "fc1", "fc2")}


# ----------------------------------------------------------------------------------------------------------------------
# Data on the device and its augmentation.

def random_resized_crop(images: torch.Tensor, out: int, generator: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-image RandomResizedCrop(out) + horizontal flip of float images [B, 3, H, W] in one ``grid_sample`` call
    (bicubic, as the reference's kornia transform). Box: area fraction ~ U(scale), log aspect ~ U(log ratio), clipped
    to the image (one draw, no rejection loop: timing only)."""
    b, _, h, w = images.shape
    dev = images.device
    area = torch.empty(b, device=dev).uniform_(*scale, generator=generator)
    logr = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    cw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)       # crop size as a fraction of the image
    ch = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (torch.rand(b, device=dev, generator=generator) * 2 - 1) * (1 - cw)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev, generator=generator) * 2 - 1) * (1 - ch)
    flip = torch.where(torch.rand(b, device=dev, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    grid = F.affine_grid(theta, (b, 3, out, out), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def _prepare(images_u8: torch.Tensor, idx: torch.Tensor, out: int, generator: torch.Generator) -> torch.Tensor:
    x = images_u8[idx].permute(0, 3, 1, 2).float() / 255.0
    return (random_resized_crop(x, out, generator) - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------------------------------
# One client: local training and the Gram pass.

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    # fp16 autocast as Lightning's "16-mixed"; CPUs (tests only) autocast to bfloat16
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def local_train(model: ViT, frozen: Mapping[str, torch.Tensor], lora: dict, head: dict, factor: str,
                images_u8: torch.Tensor, labels: torch.Tensor, part: np.ndarray, *, batch: int, epochs: int,
                lr: float, lr_factor: float, image_size: int, seed: int) -> tuple[dict, dict, int]:
    """The reference's local epochs for one client (module docstring, steps 1–2). Returns the client's LoRA and head
    (detached copies) and the number of optimizer steps."""
    device = images_u8.device
    lora = {k: {f: v.detach().clone().requires_grad_(True) for f, v in ab.items()} for k, ab in lora.items()}
    head = {k: v.detach().clone().requires_grad_(True) for k, v in head.items()}
    trained = [ab[factor] for ab in lora.values()]
    opt = torch.optim.AdamW([{"params": trained, "lr": lr_factor}, {"params": list(head.values())}], lr=lr,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(part)
        for start in range(0, len(order), batch):
            idx = torch.as_tensor(order[start:start + batch], device=device)
            x = _prepare(images_u8, idx, image_size, gen)
            opt.zero_grad()
            weights = {k: v.clone() for k, v in frozen.items()}  # the reference deep-copies the state dict per step
            weights.update(head)
            for name, ab in lora.items():
                weights[name + ".weight"] = weights[name + ".weight"] + ab["B"] @ ab["A"]
            with _autocast(device):
                loss = F.cross_entropy(torch.func.functional_call(model, weights, (x,)), labels[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss.item()
            steps += 1
    detach = lambda t: {k: v.detach() for k, v in t.items()}
    return {k: detach(ab) for k, ab in lora.items()}, detach(head), steps


def gram_pass(model: ViT, frozen: Mapping[str, torch.Tensor], lora: dict, head: dict, images_u8: torch.Tensor,
              part: np.ndarray, *, batch: int, passes: int, image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The reference's Gram collection for one client (module docstring, step 3): dense float32 ``Σ xᵀx`` of every
    LoRA layer's and the head's input over all tokens, moved to the host and regularised there."""
    device = images_u8.device
    targets = {**lora_modules(model), "head": model.head}
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().to(torch.float32)
            x = x.reshape(-1, x.shape[-1])
            g = x.T @ x
            sums[name] = g if name not in sums else sums[name] + g
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    weights = dict(frozen)
    weights.update(head)
    for name, ab in lora.items():
        weights[name + ".weight"] = frozen[name + ".weight"] + ab["B"] @ ab["A"]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    model.eval()
    try:
        with torch.no_grad(), _autocast(device):
            for _ in range(passes):
                for start in range(0, len(part), batch):
                    idx = torch.as_tensor(part[start:start + batch], device=device)
                    torch.func.functional_call(model, weights, (_prepare(images_u8, idx, image_size, gen),))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, g in sums.items():
        g = g.cpu()
        alpha = GRAM_ALPHA_HEAD if name == "head" else GRAM_ALPHA_BACKBONE
        out[name] = alpha * g + (1 - alpha) * torch.eye(g.shape[0]) * g
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The server.

def merge_layer(factor: str, client_factors: Sequence[torch.Tensor], shared: torch.Tensor,
                grams: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One LoRA layer as the reference merges it: float64 on the device, ``pinverse``; float32 result.

    A-round: client_factors are the A_i [r, d_in]; B-round: the B_i [d_out, r] and ``shared`` is the common A."""
    f64 = torch.float64
    gs = [g.to(device).to(f64) for g in grams]
    total = torch.stack(gs).sum(0)
    if factor == "A":
        e = torch.stack([a.to(device).to(f64) @ g for a, g in zip(client_factors, gs)]).sum(0)
        return (e @ torch.pinverse(total)).to(torch.float32)
    a = shared.to(device).to(f64)
    e2 = torch.stack([(b.to(device).to(f64) @ a) @ g for b, g in zip(client_factors, gs)]).sum(0)
    return (e2 @ a.T @ torch.pinverse(a @ total @ a.T)).to(torch.float32)


def merge_head(heads: Sequence[dict], grams: Sequence[torch.Tensor], weights: Sequence[float],
               device: torch.device) -> dict:
    f64 = torch.float64
    gs = [g.to(device).to(f64) for g in grams]
    w = (torch.stack([h["weight"].to(f64) @ g for h, g in zip(heads, gs)]).sum(0)
         @ torch.inverse(torch.stack(gs).sum(0)))
    total = sum(weights)
    b = sum(h["bias"] * (n / total) for h, n in zip(heads, weights))
    return {"weight": w.to(torch.float32), "bias": b}


# ----------------------------------------------------------------------------------------------------------------------
# The round.

def _timed(fn, device) -> tuple[float, object]:
    """(seconds, ``fn()``) with the device's queue drained before and after (:func:`lorm_jax.bench.common.timed`)."""
    _sync(device)
    t = common.timed(fn, sync=lambda _: _sync(device))
    return t.seconds, t.out


def build(arch: Mapping, num_classes: int, rank: int, device: torch.device, seed: int = 0):
    """(model, frozen state dict on the device, server LoRA {layer: {"A", "B"}}, server head)."""
    torch.manual_seed(seed)
    model = ViT(**arch, num_classes=num_classes).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    lora = {}
    for name, m in lora_modules(model).items():
        d_out, d_in = m.weight.shape
        a = torch.empty(rank, d_in, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # U(±1/√d_in), B = 0 (LORM_SPEC §4)
        lora[name] = {"A": a, "B": torch.zeros(d_out, rank, device=device)}
    head = {"head.weight": model.head.weight.detach().clone(), "head.bias": model.head.bias.detach().clone()}
    return model, frozen, lora, head


def reference_round(images: np.ndarray, labels: np.ndarray, partitions: Sequence[np.ndarray], *, arch: Mapping,
                    num_classes: int, rank: int, factor: str = "B", batch: int = 16, epochs: int = 1,
                    gram_passes: int = 1, lr: float = 3e-3, device: str | None = None, seed: int = 0,
                    state=None) -> dict:
    """One round of the reference's loop (module docstring) on ``images`` uint8 [N, h, w, 3] and ``labels`` [N] (task
    classes 0..num_classes−1), clients = ``partitions`` (index arrays). Returns the phase wall times (s, device
    synchronised), the steps and images trained, and the merged LoRA / head; pass ``state`` (from a previous call) to
    reuse the built network, as a second round of the same run would."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_float32_matmul_precision("medium")
    t_build = 0.0
    if state is None:
        t_build, state = _timed(lambda: build(arch, num_classes, rank, dev, seed), dev)
        state = {"net": state, "images": torch.as_tensor(images, device=dev),
                 "labels": torch.as_tensor(np.asarray(labels, np.int64), device=dev)}
    model, frozen, lora, head = state["net"]
    image_size = arch["image_size"]
    train_s = gram_s = 0.0
    uploads, steps = [], 0
    for k, part in enumerate(partitions):
        part = np.asarray(part)
        dt, (c_lora, c_head, n) = _timed(lambda: local_train(
            model, frozen, lora, head, factor, state["images"], state["labels"], part, batch=batch, epochs=epochs,
            lr=lr, lr_factor=lr, image_size=image_size, seed=seed * 1000 + k), dev)
        train_s += dt
        steps += n
        dt, grams = _timed(lambda: gram_pass(model, frozen, c_lora, c_head, state["images"], part, batch=batch,
                                             passes=gram_passes, image_size=image_size, seed=seed * 1000 + k), dev)
        gram_s += dt
        uploads.append({"lora": c_lora, "head": {"weight": c_head["head.weight"], "bias": c_head["head.bias"]},
                        "grams": grams, "n": len(part)})

    def server():
        merged = {}
        for name, ab in lora.items():
            if factor == "A":
                merged[name] = {"A": merge_layer("A", [u["lora"][name]["A"] for u in uploads], ab["B"],
                                                 [u["grams"][name] for u in uploads], dev), "B": ab["B"]}
            else:
                merged[name] = {"A": ab["A"], "B": merge_layer("B", [u["lora"][name]["B"] for u in uploads],
                                                               ab["A"], [u["grams"][name] for u in uploads], dev)}
        new_head = merge_head([u["head"] for u in uploads], [u["grams"]["head"] for u in uploads],
                              [u["n"] for u in uploads], dev)
        return merged, new_head
    merge_s, (merged, new_head) = _timed(server, dev)
    images_trained = sum(len(p) for p in partitions) * epochs
    return {"build_s": t_build, "train_s": train_s, "gram_s": gram_s, "merge_s": merge_s,
            "round_s": train_s + gram_s + merge_s, "steps": steps, "images": images_trained,
            "gram_images": sum(len(p) for p in partitions) * gram_passes, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "lora": merged, "head": new_head, "state": state}


def reference_merge(factor: str, client_lora: Mapping[str, Mapping[str, np.ndarray]],
                    grams: Mapping[str, np.ndarray], *, device: str | None = None,
                    layers_per_shape: int | None = None) -> dict:
    """The reference's server merge of a whole model from host arrays (client_lora ``{path: {"A": [K, r, d_in],
    "B": [K, d_out, r]}}``, grams ``{path: [K, d_in, d_in]}`` float32, dense as the reference sends them).

    With ``layers_per_shape``, only that many layers of each distinct (A, B) shape are merged and the total is
    extrapolated (``time × count / merged``): float64 ``pinverse`` of a 3072² matrix takes seconds on a GPU. Returns
    ``{"s": total seconds (extrapolated), "measured_s", "layers", "merged_layers", "out": {path: merged factor}}``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_float32_matmul_precision("medium")
    by_shape: dict[tuple, list[str]] = {}
    for path, f in client_lora.items():
        by_shape.setdefault((f["A"].shape, f["B"].shape), []).append(path)
    warm = torch.eye(4, dtype=torch.float64, device=dev)
    _timed(lambda: torch.pinverse(warm), dev)  # library initialisation (cuSOLVER handles) is not the merge's cost
    total, measured, out = 0.0, 0.0, {}
    for paths in by_shape.values():
        chosen = paths if layers_per_shape is None else paths[:max(1, layers_per_shape)]
        spent = 0.0
        for path in chosen:
            f = client_lora[path]
            g = [torch.from_numpy(np.asarray(x)) for x in grams[path]]  # host tensors, as the reference keeps them
            if factor == "A":
                fac, shared = [torch.from_numpy(np.asarray(x)) for x in f["A"]], None
            else:
                fac, shared = [torch.from_numpy(np.asarray(x)) for x in f["B"]], torch.from_numpy(np.asarray(f["A"][0]))
            dt, res = _timed(lambda: merge_layer(factor, fac, shared, g, dev), dev)
            spent += dt
            out[path] = res.cpu().numpy()
        measured += spent
        total += spent * len(paths) / len(chosen)
    return {"s": total, "measured_s": measured, "layers": len(client_lora), "merged_layers": len(out), "out": out}
