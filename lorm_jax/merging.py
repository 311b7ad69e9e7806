"""Closed-form merges of linear layers and LoRA factors (LoRM, RegMean, FedAvg).

Convention (the paper's): a linear layer is ``y = W x`` with ``W ∈ R^{d_out×d_in}``, LoRA ``ΔW = B A`` with
``B ∈ R^{d_out×r}``, ``A ∈ R^{r×d_in}``, and client k's Gram of the layer input ``G_k = Σ x xᵀ ∈ R^{d_in×d_in}``.
The client axis comes first. A Gram argument is full ``[K, d, d]`` or diagonal ``[K, d]`` (a 2-D array is diagonal).

Every merge minimises a response-matching objective in closed form::

    regmean(W, G)      = argmin_W  Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²      = (Σ W_k G_k)(Σ G_k)^+
    merge_lora_A(A, G) = argmin_A  Σ_k ‖X_k (B A)ᵀ − X_k (B A_k)ᵀ‖² = (Σ A_k G_k)(Σ G_k)^+          (B shared)
    merge_lora_B(B,A,G)= argmin_B  Σ_k ‖X_k (B A)ᵀ − X_k (B_k A)ᵀ‖² = (Σ B_k A G_k) Aᵀ (A (Σ G_k) Aᵀ)^+  (A shared)

All three are one operation, ``solve_gram(E, G) = E G^+`` for a symmetric PSD ``G``:

* diagonal ``G = diag(g)``: ``E[:, j] / g[j]`` (0 where ``g[j] = 0``), O(d), never a d×d matrix;
* full ``G``: features with a zero diagonal are dropped (they are exactly the zero columns, which ``^+`` maps to 0),
  the rest is Jacobi-scaled to a unit diagonal ``Ĝ = D^{-1/2} G D^{-1/2}`` and solved by Cholesky with one step of
  iterative refinement (the *fast path*). When ``λ̂_min``, the smaller of the smallest squared Cholesky pivot and a
  3-step inverse-iteration estimate of ``λ_min(Ĝ)`` (both bound it from above), is at most ``SINGULAR_PIVOT`` (1e-5
  in float32), or the result is not finite, an eigendecomposition pseudo-inverse of the unscaled matrix (eigenvalues
  below ``PINV_RCOND · max`` dropped) answers instead, so rank-deficient Grams give the minimum-norm (``pinv``)
  solution and never inf/NaN. (The pivots alone miss singular matrices: rank deficiency from too few samples can leave
  every squared pivot above 1e-5 in float32, and the fast path then returns a solution far from the minimum-norm one.)

  Accuracy bound: Cholesky is backward stable, so the fast path's relative error is ≲ ``c · cond(Ĝ) · u`` (u = 6e-8 in
  float32). It is taken only when ``λ̂_min > 1e-5`` and ``λ̂_min`` is within a small factor of ``λ_min`` (unless the
  fixed start vector is nearly orthogonal to the smallest eigenvector), so the error is ≲ ``c · u · λ_max(Ĝ) / 1e-5
  = c · 6e-3 · λ_max(Ĝ)`` with ``λ_max(Ĝ) ∈ [1, d]`` (≈ 1 + (d − 1) × the mean feature correlation): a guarantee only
  for weakly correlated features. Gram matrices of activations do much better than this worst case: the measured
  error against a float64 ``pinv`` on activation-like ViT Grams (48 layers, d up to 1536) is
  ~1e-5 (docs/BENCHMARKS.md). The pseudo-inverse path inverts the kept eigenvalues exactly, error ≲ ``c · u ·
  λ_max / λ_kept``, and sets the dropped directions to 0 as ``pinv`` does.

**Cost under vmap.** The fallback is a real branch both unbatched and under ``jax.vmap`` (a plain ``lax.cond`` would
become a select under vmap and evaluate eigh for every layer): :func:`solve_gram`'s full path is a
:func:`jax.custom_batching.custom_vmap` whose batching rule hands the whole stack of L systems (nested vmaps flattened)
to one solver. On GPU/TPU it runs one batched Cholesky, and only if some layer failed the test a ``lax.map`` over the
layers in which each failed one takes the eigh branch (``lax.cond`` on a per-layer scalar stays a conditional). On
CPU it loops over the layers with the per-layer ``lax.cond`` (:func:`_solve_stack_looped` says why). Either way
healthy Grams cost one Cholesky and a few triangular solves per layer and never evaluate eigh, and batched and
unbatched calls take the same branch per layer, differing only by float rounding.

Everything is ``jit``/``vmap`` compatible and returns float32. With ``jax_enable_x64`` on, ``dtype=jnp.float64``
computes in double precision (TPUs have no float64; the float32 path is the accurate default).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# λ̂_min of the unit-diagonal, Jacobi-scaled matrix (smallest Cholesky pivot² or inverse-iteration estimate, whichever
# is smaller) at or below this means the matrix is too ill-conditioned for the fast path: the eigh pseudo-inverse takes
# over. cond(Ĝ) <= d / λ_min(Ĝ), since λ_max(Ĝ) <= trace = d.
SINGULAR_PIVOT = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float64): 1e-12}
# Inverse-iteration steps behind λ̂_min: the start vector's weight on the smallest eigenvector is multiplied by
# (λ_2 / λ_min) per step, so 3 steps resolve a singular or badly conditioned direction from a ~1/√d start.
INVERSE_ITERATIONS = 3
# On CPU a stack of at most this many systems (under vmap) of size d ≥ CPU_UNROLL_MIN_DIM is solved unrolled; longer
# stacks and small systems (e.g. LoRM's r×r B-merge systems, where compiling 48 unrolled solves took ~6 s and running
# them a few ms) run in one lax.map loop.
CPU_UNROLL = 64
CPU_UNROLL_MIN_DIM = 128
# Relative eigenvalue cut-off of the pseudo-inverse fallback (numpy/torch pinv use max(M,N)·eps; float64 torch 1e-15).
PINV_RCOND = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.float64): 1e-13}


# Whether the solvers being traced compile the eigh fallback in ("inline", the default: what any jit of a merge gets) or
# leave it out and answer NaN where it would be needed (inside :func:`fast_first`, which then runs the inline program).
_TRACING = threading.local()


def _fallback_inline() -> bool:
    return getattr(_TRACING, "inline", True)


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _compute_dtype(dtype):
    dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs jax.config.update('jax_enable_x64', True) before any array is created")
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"merge dtype must be float32 or float64, got {dtype}")
    return dtype


def is_diagonal(grams: jax.Array) -> bool:
    """A client-stacked Gram is diagonal when it is ``[K, d]`` (full ones are ``[K, d, d]``)."""
    if grams.ndim not in (2, 3):
        raise ValueError(f"grams must be [K, d] (diagonal) or [K, d, d] (full), got shape {grams.shape}")
    return grams.ndim == 2


def shrink_gram(gram: jax.Array, alpha: float) -> jax.Array:
    """RegMean shrinkage ``α G + (1 − α) diag(G)`` of full Grams ``[..., d, d]`` (α = 0: diagonal only; α = 1: G).

    Shrinking keeps the diagonal, so a diagonal Gram ``[..., d]`` needs no shrinking at all (and should never be
    expanded to d×d for it). Float32 out (float64 for float64 Grams).
    """
    if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"shrink_gram expects full Grams [..., d, d], got shape {gram.shape}")
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    eye = jnp.eye(gram.shape[-1], dtype=bool)
    return jnp.where(eye, diag[..., None, :], alpha * gram).astype(jnp.promote_types(gram.dtype, jnp.float32))


def _diag_solve(e: jax.Array, g: jax.Array) -> jax.Array:
    """``E diag(g)^+``: column-wise division, 0 where ``g = 0``. e: [m, d], g: [d]."""
    live = g > 0
    return jnp.where(live, e / jnp.where(live, g, 1), 0)


def _eigh(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(w, v)`` with ``g = V diag(w) Vᵀ``. On TPU with the Jacobi kernel (one custom call): JAX's default there for
    d > 256 is a divide-and-conquer written in JAX whose program takes minutes to compile (docs/TPU.md)."""
    def jacobi(g):
        v, w = jax.lax.linalg.eigh(g, implementation=jax.lax.linalg.EighImplementation.JACOBI)
        return w, v
    return jax.lax.platform_dependent(g, tpu=jacobi, default=lambda g: tuple(jnp.linalg.eigh(g)))


def _pinv_solve(e: jax.Array, g: jax.Array) -> jax.Array:
    """``E G^+`` through ``G = V diag(w) Vᵀ``, eigenvalues below ``rcond · max w`` treated as 0."""
    w, v = _eigh(g)
    cut = PINV_RCOND[g.dtype] * jnp.max(jnp.abs(w))
    inv_w = jnp.where(w > cut, 1 / jnp.where(w > cut, w, 1), 0)
    return _mm(_mm(e, v) * inv_w, v.T)


def _conditioning(chol: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(smallest pivot², λ̂_min)`` of ``Ĝ = L Lᵀ`` from its Cholesky factor L [d, d]; 0 where not finite.

    ``λ̂_min = min(pivot², 1/‖Ĝ^{-1} u_i‖)`` over ``INVERSE_ITERATIONS`` steps of inverse iteration from a fixed
    pseudo-random unit vector (2 triangular solves each, O(d²)). Both terms bound ``λ_min(Ĝ)`` from above; the pivots
    alone can miss a singular matrix by orders of magnitude (rank deficiency from too few samples leaves every pivot²
    ~1e-6 while ``λ_min ≈ 0``), inverse iteration closes in on ``λ_min`` geometrically.
    """
    pivot = jnp.min(jnp.diagonal(chol)) ** 2
    probe = np.random.default_rng(0).standard_normal(chol.shape[0])
    u = jnp.asarray(probe / np.linalg.norm(probe), chol.dtype)

    def iterate(_, carry):  # a loop, not unrolled: one pair of triangular solves to compile (TPU: ~0.5 s each)
        lam, u = carry
        y = jax.scipy.linalg.cho_solve((chol, True), u)
        norm = jnp.linalg.norm(y)
        return jnp.minimum(lam, 1 / norm), y / norm

    lam, _ = jax.lax.fori_loop(0, INVERSE_ITERATIONS, iterate, (pivot, u))
    finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
    return finite(pivot), finite(lam)


def _cholesky_solve(e: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``E G^{-1}`` for a positive-definite G with unit diagonal; also returns ``λ̂_min`` (:func:`_conditioning`)."""
    # potrf reads one triangle only; skipping the default (G + Gᵀ)/2 pass saves ~30 % of the time at d = 1536.
    chol = jnp.linalg.cholesky(g, symmetrize_input=False)
    solve = lambda rhs: jax.scipy.linalg.cho_solve((chol, True), rhs.T).T  # X G = R  <=>  G Xᵀ = Rᵀ
    x = solve(e)
    x = x + solve(e - _mm(x, g))  # one step of iterative refinement
    return x, _conditioning(chol)[1]


def _jacobi_scale(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(D^{-1/2} G D^{-1/2}, D^{-1/2})`` for a PSD ``G`` [d, d] with ``D = diag(G)``: unit diagonal.

    Dead features (zero Gram diagonal ⇒ zero row/column of a PSD matrix) get ``D^{-1/2} = 0`` and an identity row.
    """
    diag = jnp.diagonal(g)
    live = diag > 0
    inv_sqrt = jnp.where(live, jax.lax.rsqrt(jnp.where(live, diag, 1)), 0)
    return jnp.where(jnp.eye(g.shape[0], dtype=bool), 1, g * inv_sqrt[:, None] * inv_sqrt[None, :]), inv_sqrt


def _fast_solve(e: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Cholesky fast path of ``E G^+`` (module docstring) and whether it holds: ``(X [m, d], ok [])``."""
    g_scaled, inv_sqrt = _jacobi_scale(g)
    x_scaled, lam = _cholesky_solve(e * inv_sqrt, g_scaled)
    fast = x_scaled * inv_sqrt
    return fast, (lam > SINGULAR_PIVOT[g.dtype]) & jnp.all(jnp.isfinite(fast))


def _solve_one(e: jax.Array, g: jax.Array, inline: bool = True) -> jax.Array:
    """``E G^+`` for one system: the fast path, or the eigh pseudo-inverse when its test fails (a real branch); with
    ``inline`` off, NaN where the pseudo-inverse would be needed (see :func:`fast_first`)."""
    fast, ok = _fast_solve(e, g)
    if not inline:
        return jnp.where(ok, fast, jnp.nan)
    return jax.lax.cond(ok, lambda: fast, lambda: _pinv_solve(e, g))


def _solve_stack_looped(e: jax.Array, g: jax.Array, inline: bool = True) -> jax.Array:
    """The stack one system at a time: the CPU path. Up to ``CPU_UNROLL`` systems of size d ≥ ``CPU_UNROLL_MIN_DIM``
    are unrolled (independent ops XLA may overlap, as for layers merged one by one); longer stacks and small systems,
    whose solves cost less than compiling their unrolled copies, run under ``lax.map``.

    jaxlib's batched CPU LAPACK kernels split their batch over XLA's intra-op thread pool and block a pool thread
    until the pieces finish; two of them running at once (independent layer groups of one program) can take every
    thread of a small pool and deadlock (seen with 2 threads on the 2-core machine). Unbatched calls never wait on the
    pool, and a CPU gains nothing from batching d×d factorisations anyway.
    """
    if e.shape[0] <= CPU_UNROLL and g.shape[-1] >= CPU_UNROLL_MIN_DIM:
        return jnp.stack([_solve_one(e[i], g[i], inline) for i in range(e.shape[0])])
    return jax.lax.map(lambda args: _solve_one(*args, inline), (e, g))


def _solve_stack_batched(e: jax.Array, g: jax.Array, inline: bool = True) -> jax.Array:
    """The stack as one batched fast path (GPU/TPU); the eigh pseudo-inverse runs only when some layer needs it, and
    then only for those layers (per-layer ``lax.cond`` inside ``lax.map``); with ``inline`` off, NaN for them."""
    fast, ok = jax.vmap(_fast_solve)(e, g)
    if not inline:
        return jnp.where(ok[:, None, None], fast, jnp.nan)

    def repair():
        def layer(args):
            e_l, g_l, fast_l, ok_l = args
            return jax.lax.cond(ok_l, lambda: fast_l, lambda: _pinv_solve(e_l, g_l))
        return jax.lax.map(layer, (e, g, fast, ok))

    return jax.lax.cond(jnp.all(ok), lambda: fast, repair)


def _stack_solver(inline: bool):
    """``E_l G_l^+`` for a stack of L systems, e [L, m, d], g [L, d, d] → [L, m, d], with the eigh fallback compiled
    in (``inline``) or replaced by NaN (:func:`fast_first`).

    Being a ``custom_vmap``, a vmap over the solver folds its axis into L instead of turning the fallback's
    conditionals into selects (which would evaluate eigh for every layer). One solver object per mode, so that no
    trace of one mode is ever reused for the other.
    """
    @jax.custom_batching.custom_vmap
    def solve_stack(e: jax.Array, g: jax.Array) -> jax.Array:
        if e.shape[0] == 1:
            return _solve_one(e[0], g[0], inline)[None]
        return jax.lax.platform_dependent(e, g, cpu=functools.partial(_solve_stack_looped, inline=inline),
                                          default=functools.partial(_solve_stack_batched, inline=inline))

    @solve_stack.def_vmap
    def solve_stack_vmap(axis_size: int, in_batched, e: jax.Array, g: jax.Array):
        """vmap of the solver: stacks [N, L, ...] are solved as one stack of N·L systems."""
        e, g = (x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
                for x, batched in zip((e, g), in_batched))
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        return solve_stack(flat(e), flat(g)).reshape(e.shape), True

    return solve_stack


_SOLVE_STACK = {True: _stack_solver(True), False: _stack_solver(False)}


def _full_solve(e: jax.Array, g: jax.Array) -> jax.Array:
    """``E G^+`` for a symmetric PSD ``G`` [d, d] and ``E`` [m, d] (see the module docstring)."""
    return _SOLVE_STACK[_fallback_inline()](e[None], g[None])[0]


def solve_gram(e: jax.Array, gram: jax.Array, *, dtype=None) -> jax.Array:
    """``E G^+`` for ``E`` [m, d] and a summed Gram ``G``: full [d, d] or diagonal [d]. Returns float32 [m, d]."""
    dtype = _compute_dtype(dtype)
    e, gram = e.astype(dtype), gram.astype(dtype)
    out = _diag_solve(e, gram) if gram.ndim == 1 else _full_solve(e, gram)
    return out.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class FastFirst:
    """A jitted merge whose per-round program never contains the eigh fallback (see :func:`fast_first`).

    ``fast``: the program with every full-Gram solve on its Cholesky fast path, a NaN where the fallback would be
    needed; it returns ``(out, finite)``. ``exact``: the ordinary jit, fallback inline, compiled on first use only.
    """
    fast: Callable
    exact: Callable

    def __call__(self, *args, **kwargs):
        out, finite = self.fast(*args, **kwargs)
        return out if bool(finite) else self.exact(*args, **kwargs)


def fast_first(fn: Callable, **jit_kwargs) -> FastFirst:
    """``jax.jit(fn, **jit_kwargs)`` that compiles the eigh pseudo-inverse only when a call needs it.

    The fallback is for numerically singular Grams, which the fast path's test detects; it is rare (shrunk Grams,
    ``α < 1``, are positive definite) but as a real branch it is compiled into every program that merges with full
    Grams, and an eigendecomposition is the most expensive op to compile there is (TPU: ~90 s for one d = 768 merge,
    docs/TPU.md). Here ``fn`` is traced with the fallback left out: a system whose fast path fails yields NaN, and a
    call whose output holds a NaN or inf runs ``fn`` again as the ordinary jit (compiled then, once). So the result
    is always the inline one's: if a failed fast path does not reach the output, the fallback would not have changed it.
    """
    @functools.wraps(fn)
    def deferred(*args, **kwargs):
        previous = _fallback_inline()
        _TRACING.inline = False
        try:
            out = fn(*args, **kwargs)
        finally:
            _TRACING.inline = previous
        leaves = [x for x in jax.tree.leaves(out) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
        return out, finite

    return FastFirst(fast=jax.jit(deferred, **jit_kwargs), exact=jax.jit(fn, **jit_kwargs))


def gram_health(gram: jax.Array, *, dtype=None) -> dict:
    """How :func:`solve_gram` sees a summed Gram ``G`` (full [d, d] or diagonal [d]), as float32 scalars.

    * ``min_pivot``: smallest squared Cholesky pivot of the Jacobi-scaled live block ``Ĝ = D^{-1/2} G D^{-1/2}`` (unit
      diagonal): 1 when the live features are orthogonal, small when ill-conditioned, 0 when Cholesky fails.
    * ``min_eig``: ``λ̂_min(Ĝ)``, the smaller of ``min_pivot`` and an inverse-iteration estimate of ``λ_min(Ĝ)``
      (an upper bound on it; ~1/cond(Ĝ) up to ``λ_max(Ĝ) ∈ [1, d]``).
    * ``pinv``: 1 when the eigh pseudo-inverse fallback is taken (``min_eig <= SINGULAR_PIVOT``), else 0.
    * ``dead``: features with a zero diagonal (no input energy; their merged columns are 0).

    A diagonal Gram has ``min_pivot = min_eig = 1`` (its solve is an exact division).
    """
    dtype = _compute_dtype(dtype)
    gram = gram.astype(dtype)
    diag = gram if gram.ndim == 1 else jnp.diagonal(gram)
    dead = jnp.sum(diag <= 0).astype(jnp.float32)
    if gram.ndim == 1:
        return {"min_pivot": jnp.float32(1.0), "min_eig": jnp.float32(1.0), "pinv": jnp.float32(0.0), "dead": dead}
    g_scaled, _ = _jacobi_scale(gram)
    pivot, lam = _conditioning(jnp.linalg.cholesky(g_scaled, symmetrize_input=False))
    return {"min_pivot": pivot.astype(jnp.float32), "min_eig": lam.astype(jnp.float32),
            "pinv": (lam <= SINGULAR_PIVOT[dtype]).astype(jnp.float32), "dead": dead}


def client_sum(x: jax.Array) -> jax.Array:
    """``Σ_k x_k`` over the leading axis as a contraction with ones (XLA:CPU reduces a leading axis ~30× slower)."""
    return jnp.tensordot(jnp.ones(x.shape[0], x.dtype), x, axes=1, precision=HIGHEST)


def _weighted_sum(x: jax.Array, grams: jax.Array) -> jax.Array:
    """``Σ_k X_k G_k`` for X [K, m, d] and Grams [K, d] or [K, d, d]."""
    if is_diagonal(grams):
        return jnp.einsum("kmd,kd->md", x, grams, precision=HIGHEST)
    return jax.lax.platform_dependent(x, grams, cpu=_weighted_sum_one_matmul, default=sum_of_products)


def _weighted_sum_one_matmul(x: jax.Array, grams: jax.Array) -> jax.Array:
    """``Σ_k X_k G_k`` as one ``[m, K·d] @ [K·d, d]`` matmul: XLA:CPU runs it ~3× faster than the batched einsum."""
    k, m, d = x.shape
    return _mm(jnp.transpose(x, (1, 0, 2)).reshape(m, k * d), grams.reshape(k * d, grams.shape[-1]))


def sum_of_products(x: jax.Array, y: jax.Array) -> jax.Array:
    """``Σ_k X_k Y_k`` for x [K, m, n], y [K, n, p] → [m, p] as a loop over k: what accelerators run for the sums
    that the CPU forms as one matmul. XLA's TPU compiler needs 6.5 s for the RegMean head sums of 10 clients (100
    classes, d = 768) as one ``[m, K·d] @ [K·d, d]`` matmul (it lays X out transposed and retries), 0.7 s for this;
    likewise for LoRM's ``Σ_k B_k (A_k G_k)`` of rank-r terms (docs/TPU.md)."""
    return jax.lax.fori_loop(0, x.shape[0], lambda k, acc: acc + _mm(x[k], y[k]),
                             jnp.zeros((x.shape[1], y.shape[-1]), jnp.result_type(x, y)))


def _check(x: jax.Array, grams: jax.Array, name: str, axis: int = -1):
    if x.ndim != 3:
        raise ValueError(f"{name} must be client-stacked [K, ., .], got shape {x.shape}")
    if grams.shape[0] != x.shape[0] or grams.shape[1] != x.shape[axis]:
        raise ValueError(f"grams {grams.shape} do not match {name} {x.shape}: need K={x.shape[0]} clients and "
                         f"d_in={x.shape[axis]}")


def regmean_system(weights: jax.Array, grams: jax.Array, *, dtype=None) -> tuple[jax.Array, jax.Array]:
    """The normal equations of :func:`regmean`, sums over clients: ``(E, G) = (Σ_k W_k G_k, Σ_k G_k)``.

    weights [K, d_out, d_in], grams [K, d_in(, d_in)] → E [d_out, d_in], G [d_in(, d_in)]; the merge is ``E G^+``.
    """
    _check(weights, grams, "weights")
    dtype = _compute_dtype(dtype)
    weights, grams = weights.astype(dtype), grams.astype(dtype)
    return _weighted_sum(weights, grams), client_sum(grams)


def regmean(weights: jax.Array, grams: jax.Array, *, dtype=None) -> jax.Array:
    """RegMean: ``(Σ_k W_k G_k)(Σ_k G_k)^+``. weights [K, d_out, d_in], grams [K, d_in(, d_in)] → [d_out, d_in]."""
    return solve_gram(*regmean_system(weights, grams, dtype=dtype), dtype=dtype)


def merge_lora_A(a: jax.Array, grams: jax.Array, *, dtype=None) -> jax.Array:
    """LoRM merge of A with B shared: ``(Σ_k A_k G_k)(Σ_k G_k)^+``. a [K, r, d_in] → [r, d_in].

    It minimises ``Σ_k ‖X_k (B A)ᵀ − X_k (B A_k)ᵀ‖²`` for any B of full column rank (B cancels from the normal
    equations), which is why B is not an argument.
    """
    return regmean(a, grams, dtype=dtype)


def lora_b_system(b: jax.Array, a: jax.Array, grams: jax.Array, *, dtype=None) -> tuple[jax.Array, jax.Array]:
    """The normal equations of :func:`merge_lora_B`: ``(Σ_k B_k A G_k Aᵀ, Σ_k A G_k Aᵀ)``, [d_out, r] and [r, r]."""
    if b.ndim != 3 or a.ndim != 2 or b.shape[2] != a.shape[0]:
        raise ValueError(f"merge_lora_B needs b [K, d_out, r] and a [r, d_in], got {b.shape} and {a.shape}")
    if grams.shape[0] != b.shape[0] or grams.shape[1] != a.shape[1]:
        raise ValueError(f"grams {grams.shape} do not match K={b.shape[0]} clients and d_in={a.shape[1]}")
    dtype = _compute_dtype(dtype)
    b, a, grams = b.astype(dtype), a.astype(dtype), grams.astype(dtype)
    if is_diagonal(grams):
        projected = jnp.einsum("rd,kd,sd->krs", a, grams, a, precision=HIGHEST)  # A G_k Aᵀ  [K, r, r]
    else:
        projected = jnp.einsum("rd,kde,se->krs", a, grams, a, precision=HIGHEST)
    return jnp.einsum("kor,krs->os", b, projected, precision=HIGHEST), client_sum(projected)


def merge_lora_B(b: jax.Array, a: jax.Array, grams: jax.Array, *, dtype=None) -> jax.Array:
    """LoRM merge of B with A shared: ``(Σ_k B_k A G_k) Aᵀ (A (Σ_k G_k) Aᵀ)^+``.

    b [K, d_out, r], a [r, d_in] → [d_out, r]. Only an r×r system is solved; with diagonal Grams
    ``A G_k Aᵀ = (A ⊙ g_k) Aᵀ`` costs O(r² d).
    """
    return solve_gram(*lora_b_system(b, a, grams, dtype=dtype), dtype=dtype)


def regmean_lowrank_system(b: jax.Array, a: jax.Array, grams: jax.Array, *,
                           dtype=None) -> tuple[jax.Array, jax.Array]:
    """The normal equations of :func:`regmean_lowrank`: ``(Σ_k B_k A_k G_k, Σ_k G_k)``, [d_out, d_in] and [d]."""
    if b.ndim != 3 or a.ndim != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
        raise ValueError(f"regmean_lowrank needs b [K, d_out, r] and a [K, r, d_in], got {b.shape} and {a.shape}")
    _check(a, grams, "a")
    dtype = _compute_dtype(dtype)
    b, a, grams = b.astype(dtype), a.astype(dtype), grams.astype(dtype)
    return jax.lax.platform_dependent(b, _weighted_rows(a, grams), cpu=_lowrank_sum, default=sum_of_products), \
        client_sum(grams)


def _lowrank_sum(b: jax.Array, ag: jax.Array) -> jax.Array:
    """``Σ_k B_k (A_k G_k)`` as one einsum (the CPU's path; accelerators loop: :func:`sum_of_products`)."""
    return jnp.einsum("kor,krd->od", b, ag, precision=HIGHEST)


def regmean_lowrank(b: jax.Array, a: jax.Array, grams: jax.Array, *, dtype=None) -> jax.Array:
    """RegMean of low-rank updates ``W_k = B_k A_k`` without materialising them per k: ``(Σ_k B_k A_k G_k)(Σ_k G_k)^+``.

    b [K, d_out, r], a [K, r, d_in], grams [K, d_in(, d_in)] → [d_out, d_in]. This is LoRM's cross-task merge (k runs
    over tasks, ``G_k`` summed over the clients of task k) and the ``regmean_lora`` baseline's round merge.
    """
    return solve_gram(*regmean_lowrank_system(b, a, grams, dtype=dtype), dtype=dtype)


def _weighted_rows(a: jax.Array, grams: jax.Array) -> jax.Array:
    """``A_k G_k`` per k: [K, r, d] for diagonal or full Grams."""
    if is_diagonal(grams):
        return a * grams[:, None, :]
    return jnp.einsum("krd,kde->kre", a, grams, precision=HIGHEST)


def fedavg_weights(weights: jax.Array) -> jax.Array:
    """``w_k / Σ_k w_k`` for sample weights ``w`` [K] (all-zero weights: zeros, never NaN)."""
    weights = jnp.asarray(weights, jnp.float32)
    total = weights.sum()
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1), 0)


def weighted_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
    """``Σ_k w_k x_k`` over the leading client axis in float32: x [K, ...], weights [K] → [...]."""
    return jnp.tensordot(jnp.asarray(weights, jnp.float32), x.astype(jnp.float32), axes=1, precision=HIGHEST)


def fedavg(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Sample-weighted mean ``Σ_k w_k x_k / Σ_k w_k`` over the leading client axis (uniform when weights is None).

    All-zero weights give zeros (no client contributed), never NaN.
    """
    if weights is None:
        weights = jnp.ones(x.shape[0], jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (x.shape[0],):
        raise ValueError(f"fedavg weights must be [K]={x.shape[0]}, got shape {weights.shape}")
    return weighted_sum(x, fedavg_weights(weights))


# ----------------------------------------------------------------------------------------------------------------------
# Pytree level: every LoRA layer of a model in one call (what the server uses).

def map_layers(fn: Callable, *trees: dict, sequential: bool = False) -> dict:
    """Apply ``fn(*leaves)`` per layer path.

    By default layers whose arguments have identical shapes are stacked and processed together under ``vmap`` (one
    compiled body per shape group; cheap for diagonal Grams). With ``sequential`` (used for full Grams) every layer
    gets its own ops instead: no copy of all the client-stacked d×d Grams into one stack.
    """
    paths = list(trees[0])
    if sequential:
        return {p: fn(*[t[p] for t in trees]) for p in paths}
    groups = collections.defaultdict(list)
    for p in paths:
        sig = tuple(jax.tree.map(lambda x: (x.shape, x.dtype), t[p]) for t in trees)
        groups[str(sig)].append(p)
    out = {}
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = fn(*[t[members[0]] for t in trees])
            continue
        stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[t[p] for p in members]) for t in trees]
        results = jax.vmap(fn)(*stacked)
        for i, p in enumerate(members):
            out[p] = jax.tree.map(lambda x: x[i], results)
    return {p: out[p] for p in paths}


def _any_full(grams: dict, client_axis: bool) -> bool:
    return any(g.ndim == 2 + client_axis for g in grams.values())


def solve_systems(systems: dict, *, dtype=None) -> dict:
    """``{path: E_p G_p^+}`` for ``systems = {path: (E_p [m_p, d], G_p)}`` (full or diagonal G).

    Layers whose full ``G`` have the same shape are stacked and solved as one stack (a vmap of :func:`solve_gram`,
    which the solver folds into one stacked solve), their ``E`` padded with zero rows to the group's largest ``m`` (the
    rows of ``E G^+`` are independent): a model compiles one solver per Gram shape, not one per layer (LoRM's B merge:
    one for all its r×r systems), and only the summed ``[d, d]`` Grams are stacked, never the clients' ones. A diagonal
    ``G`` is a column-wise division, solved where it is: stacking would only copy the ``E`` (the main job's merge
    residuals spent ~90 of ~130 ms a round padding and stacking its dense ``[d_out, d_in]`` systems).
    """
    groups, out = collections.defaultdict(list), {}
    for p, (e, g) in systems.items():
        if g.ndim == 1:
            out[p] = solve_gram(e, g, dtype=dtype)
        else:
            groups[(e.shape[1:], g.shape)].append(p)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = solve_gram(*systems[members[0]], dtype=dtype)
            continue
        rows = max(systems[p][0].shape[0] for p in members)
        e = jnp.stack([jnp.pad(systems[p][0], ((0, rows - systems[p][0].shape[0]), (0, 0))) for p in members])
        g = jnp.stack([systems[p][1] for p in members])
        x = jax.vmap(lambda e, g: solve_gram(e, g, dtype=dtype))(e, g)
        out.update({p: x[i, :systems[p][0].shape[0]] for i, p in enumerate(members)})
    return {p: out[p] for p in systems}


def lora_system(factors: dict, grams: jax.Array, factor: str, *, dtype=None) -> tuple[jax.Array, jax.Array]:
    """The normal equations of one layer's LoRM merge of ``factor`` (:func:`regmean_system` for "A",
    :func:`lora_b_system` for "B", with the shared A of unit 0): ``factors = {"A": [K, r, d_in], "B": [K, d_out, r]}``
    and ``grams`` [K, d_in(, d_in)] over a leading axis of units (clients, or blocks of their examples: the sums are
    linear in the Grams)."""
    if factor == "A":
        return regmean_system(factors["A"], grams, dtype=dtype)
    if factor == "B":
        return lora_b_system(factors["B"], factors["A"][0], grams, dtype=dtype)
    raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")


def merge_lora_tree(client_lora: dict, grams: dict, factor: str, *, dtype=None) -> dict:
    """Server merge of every LoRA layer after a round in which ``factor`` ("A" or "B") trained.

    client_lora: ``{path: {"A": [K, r, d_in], "B": [K, d_out, r]}}`` (the frozen factor is identical across clients);
    grams: ``{path: [K, d_in] or [K, d_in, d_in]}``. Returns the unstacked merged LoRA ``{path: {"A": [r, d_in],
    "B": [d_out, r]}}``: the trained factor merged in closed form, the frozen one passed through from client 0.
    Each layer's sums over clients (:func:`lora_system`; layers of one shape as one vmapped body for diagonal Grams;
    layer by layer for full ones, never stacking the clients' d×d Grams), then :func:`solve_systems` (one stacked
    solve per full Gram shape, e.g. all of B's r×r systems; a division where the Gram is diagonal).
    """
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    missing = set(client_lora) - set(grams)
    if missing:
        raise ValueError(f"no Gram for LoRA layers {sorted(missing)[:5]}")
    grams = {p: grams[p] for p in client_lora}
    kept = "B" if factor == "A" else "A"
    systems = map_layers(lambda f, g: lora_system(f, g, factor, dtype=dtype), client_lora, grams,
                         sequential=_any_full(grams, client_axis=True))
    solved = solve_systems(systems, dtype=dtype)
    return {p: {factor: solved[p], kept: f[kept][0].astype(jnp.float32)} for p, f in client_lora.items()}


def regmean_tree(weights: dict, grams: dict, *, dtype=None) -> dict:
    """RegMean of every layer: ``{path: W [K, d_out, d_in]}``, ``{path: G}`` → ``{path: [d_out, d_in]}``."""
    grams = {p: grams[p] for p in weights}
    if not _any_full(grams, client_axis=True):
        return map_layers(lambda w, g: regmean(w, g, dtype=dtype), weights, grams)
    return solve_systems({p: regmean_system(w, grams[p], dtype=dtype) for p, w in weights.items()}, dtype=dtype)


def regmean_lowrank_tree(b: dict, a: dict, grams: dict, *, dtype=None) -> dict:
    """:func:`regmean_lowrank` of every layer: ``{path: B [K, d_out, r]}``, ``{path: A [K, r, d_in]}``, ``{path: G}``
    → ``{path: [d_out, d_in]}`` (LoRM's cross-task merge, K = tasks)."""
    grams = {p: grams[p] for p in b}
    if not _any_full(grams, client_axis=True):
        layers = {p: {"b": b[p], "a": a[p]} for p in b}
        return map_layers(lambda f, g: regmean_lowrank(f["b"], f["a"], g, dtype=dtype), layers, grams)
    return solve_systems({p: regmean_lowrank_system(b[p], a[p], grams[p], dtype=dtype) for p in b}, dtype=dtype)


def solve_gram_tree(e: dict, grams: dict, *, dtype=None) -> dict:
    """``{path: E G^+}`` for running sums ``E = Σ_τ ΔW_τ G_τ`` [d_out, d_in] and ``G = Σ_τ G_τ`` (cross-task merge)."""
    return solve_systems({p: (e[p], grams[p]) for p in e}, dtype=dtype)


def fedavg_tree(tree, weights: jax.Array | None = None):
    """Sample-weighted mean over the leading client axis of every leaf of a client-stacked pytree."""
    return jax.tree.map(lambda x: fedavg(x, weights), tree)


# ----------------------------------------------------------------------------------------------------------------------
# Diagnostics: how well a merged low-rank update reproduces the clients' responses.

def merge_residuals(client_b: jax.Array, client_a: jax.Array, b: jax.Array, a: jax.Array, grams: jax.Array, *,
                    dtype=None, optimum: jax.Array | None = None) -> jax.Array:
    """Relative response-matching residuals ``[ρ(B A), ρ(ΔW*)]`` of one layer, with ``ΔW_k = B_k A_k``::

        ρ(W) = Σ_k tr((W − ΔW_k) G_k (W − ΔW_k)ᵀ) / Σ_k tr(ΔW_k G_k ΔW_kᵀ)        (0 when the denominator is 0)
        ΔW*  = (Σ_k ΔW_k G_k)(Σ_k G_k)^+    the RegMean optimum, so ρ(ΔW*) ≤ ρ(W) for every W

    client_b [K, d_out, r], client_a [K, r, d_in], b [d_out, r], a [r, d_in], grams [K, d_in(, d_in)] → [2] float32.
    ``ρ(B A)`` uses the low-rank form ``tr((P_kᵀ P_k)(Q_k G_k Q_kᵀ))`` with ``P_k = [B, −B_k]``, ``Q_k = [A; A_k]``
    (O(K r² d) for diagonal Grams); ``ρ(ΔW*)`` evaluates ``tr(W G Wᵀ) − 2 tr(W Eᵀ) + Σ_k tr(ΔW_k G_k ΔW_kᵀ)`` at the
    computed ``W = ΔW*`` (``E = Σ_k ΔW_k G_k``), which costs what the RegMean solve costs (``optimum``: ``ΔW*``
    solved already, e.g. with other layers by :func:`solve_systems`).
    """
    dtype = _compute_dtype(dtype)
    client_b, client_a, b, a, grams = (x.astype(dtype) for x in (client_b, client_a, b, a, grams))
    k = client_b.shape[0]
    p = jnp.concatenate([jnp.broadcast_to(b, (k,) + b.shape), -client_b], axis=2)   # [K, d_out, 2r]
    q = jnp.concatenate([jnp.broadcast_to(a, (k,) + a.shape), client_a], axis=1)    # [K, 2r, d_in]
    ptp = jnp.einsum("kor,kos->krs", p, p, precision=HIGHEST)
    if is_diagonal(grams):
        qgq = jnp.einsum("krd,kd,ksd->krs", q, grams, q, precision=HIGHEST)
    else:
        qgq = jnp.einsum("krd,kde,kse->krs", q, grams, q, precision=HIGHEST)
    r = a.shape[0]
    num = jnp.sum(ptp * qgq)
    den = jnp.sum(ptp[:, r:, r:] * qgq[:, r:, r:])                                   # Σ_k tr(ΔW_k G_k ΔW_kᵀ)
    e, total = regmean_lowrank_system(client_b, client_a, grams, dtype=dtype)
    w = (solve_gram(e, total, dtype=dtype) if optimum is None else optimum).astype(dtype)
    wgw = jnp.sum(w * w * total) if total.ndim == 1 else jnp.sum(_mm(w, total) * w)
    num_star = jnp.maximum(wgw - 2 * jnp.sum(w * e) + den, 0)
    safe = jnp.where(den > 0, den, 1)
    return jnp.where(den > 0, jnp.stack([jnp.maximum(num, 0), num_star]) / safe, 0).astype(jnp.float32)


def merge_residuals_tree(client_lora: dict, merged_lora: dict, grams: dict, *, dtype=None) -> dict:
    """:func:`merge_residuals` of every LoRA layer: ``{path: [ρ(B A), ρ(ΔW*)]}``.

    client_lora ``{path: {"A": [K, r, d_in], "B": [K, d_out, r]}}``, merged_lora unstacked, grams ``{path: [K, ...]}``.
    """
    def fn(f, m, g):
        return merge_residuals(f["B"], f["A"], m["B"], m["A"], g, dtype=dtype)
    merged = {p: {"A": merged_lora[p]["A"], "B": merged_lora[p]["B"]} for p in client_lora}
    grams = {p: grams[p] for p in client_lora}
    if not _any_full(grams, client_axis=True):
        return map_layers(fn, client_lora, merged, grams)
    optimum = solve_systems({p: regmean_lowrank_system(f["B"], f["A"], grams[p], dtype=dtype)
                             for p, f in client_lora.items()}, dtype=dtype)
    return {p: merge_residuals(f["B"], f["A"], merged[p]["B"], merged[p]["A"], grams[p], dtype=dtype,
                               optimum=optimum[p]) for p, f in client_lora.items()}


def residual_sums(client_b: jax.Array, client_a: jax.Array, grams: jax.Array, *, dtype=None) -> dict:
    """What :func:`residuals_from_sums` needs of one layer, as sums over a leading axis of units u (clients, or blocks
    of their examples; every term is linear in ``G_u``), with ``ΔW_u = B_u A_u``::

        e       = Σ_u ΔW_u G_u                  [d_out, d_in]   (the RegMean system's right-hand side)
        energy  = Σ_u tr(ΔW_u G_u ΔW_uᵀ)        []              (per unit tr((B_uᵀ B_u)(A_u G_u A_uᵀ)): O(r² d))

    client_b [U, d_out, r], client_a [U, r, d_in], grams [U, d_in(, d_in)]."""
    dtype = _compute_dtype(dtype)
    client_b, client_a, grams = client_b.astype(dtype), client_a.astype(dtype), grams.astype(dtype)
    e, _ = regmean_lowrank_system(client_b, client_a, grams, dtype=dtype)
    ag = _weighted_rows(client_a, grams)                                              # A_u G_u   [U, r, d_in]
    aga = jnp.einsum("krd,ksd->krs", ag, client_a, precision=HIGHEST)                # A_u G_u A_uᵀ
    btb = jnp.einsum("kor,kos->krs", client_b, client_b, precision=HIGHEST)
    return {"e": e, "energy": jnp.sum(btb * aga)}


def residuals_from_sums(sums: dict, gram: jax.Array, b: jax.Array, a: jax.Array, *, dtype=None,
                        optimum: jax.Array | None = None) -> jax.Array:
    """:func:`merge_residuals` from the summed statistics of :func:`residual_sums` and ``gram = Σ_u G_u``: with
    ``R(W) = tr(W G Wᵀ) − 2 tr(W eᵀ) + energy`` (= ``Σ_u tr((W − ΔW_u) G_u (W − ΔW_u)ᵀ)``),
    ``[R(B A), R(ΔW*)] / energy`` (0 when the energy is 0), ``ΔW* = e G^+`` (``optimum`` if solved already).
    ``tr(B A G Aᵀ Bᵀ) = Σ (BᵀB) ⊙ (A G Aᵀ)`` costs O(r² d); the expansion cancels where the residual is small, so
    values below ~1e-6 (float32) are rounding."""
    dtype = _compute_dtype(dtype)
    e, energy, gram, b, a = (x.astype(dtype) for x in (sums["e"], sums["energy"], gram, b, a))
    ag = a * gram if gram.ndim == 1 else _mm(a, gram)
    low_rank = jnp.sum(_mm(b.T, b) * _mm(ag, a.T)) - 2 * jnp.sum(b * _mm(e, a.T))
    w = (solve_gram(e, gram, dtype=dtype) if optimum is None else optimum).astype(dtype)
    wgw = jnp.sum(w * w * gram) if gram.ndim == 1 else jnp.sum(_mm(w, gram) * w)
    num = jnp.stack([low_rank + energy, wgw - 2 * jnp.sum(w * e) + energy])
    safe = jnp.where(energy > 0, energy, 1)
    return jnp.where(energy > 0, jnp.maximum(num, 0) / safe, 0).astype(jnp.float32)


def residuals_from_sums_tree(sums: dict, grams: dict, merged_lora: dict, *, dtype=None) -> dict:
    """:func:`residuals_from_sums` of every layer: ``{path: [ρ(B A), ρ(ΔW*)]}`` from ``sums {path: residual_sums}``,
    ``grams {path: Σ_u G_u}`` and the merged LoRA (the optima solved together, :func:`solve_systems`)."""
    optimum = solve_systems({p: (s["e"], grams[p]) for p, s in sums.items()}, dtype=dtype)
    return {p: residuals_from_sums(s, grams[p], merged_lora[p]["B"], merged_lora[p]["A"], dtype=dtype,
                                   optimum=optimum[p]) for p, s in sums.items()}
