"""Rounding bounds for the tests' float32 tolerances: each comes from the computation, not from one CPU.

XLA:CPU may add up a reduction in any order (vector width AVX2 vs AVX-512, thread count, batched vs unbatched
kernels), so a tolerance must hold for every order. For a sum or dot product of n float32 terms every order gives

    |fl(Σ t_i) − Σ t_i| ≤ γ_n Σ |t_i|,    γ_n = n u / (1 − n u),  u = 2⁻²⁴  (float32 unit roundoff)

(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1), so two float32 evaluations of the same
sum differ by at most 2 γ_n Σ|t_i|. A float32 Cholesky solve (what ``lorm_jax.merging`` does, after Jacobi scaling)
is backward stable with ``|ΔM| ≤ γ_{3n+1} |Rᵀ||R|`` (Higham Thm 10.3); forming M and the right-hand side adds γ_n
each, and the condition number κ₂ of the scaled matrix turns that into the forward error bounded by
:func:`solve_bound`. ``scripts/check_numerics.sh`` re-runs the equivalence tests on 1 and 2 threads and with another
vector width, so a bound that only this machine's rounding satisfies shows up in CI.
"""
import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff (half the machine epsilon 2⁻²³)


def gamma(n: int, u: float = U32) -> float:
    """Higham's γ_n: the relative error bound of an n-term float sum (against the sum of absolute values)."""
    assert n * u < 1
    return n * u / (1 - n * u)


def jacobi_condition(m) -> float:
    """κ₂ of ``D^-½ M D^-½`` (D = diag M) on M's nonzero spectrum: what limits a Jacobi-scaled solve with M."""
    m = np.asarray(m, np.float64)
    if m.ndim == 1:
        return 1.0
    d = np.sqrt(np.clip(np.diagonal(m), 1e-300, None))
    ev = np.linalg.eigvalsh(m / d[:, None] / d[None, :])
    ev = ev[ev > ev.max() * 1e-6]  # the pseudo-inverse cut-off side of the spectrum is not solved for
    return float(ev.max() / ev.min())


def solve_bound(m, n: int) -> float:
    """Normwise relative forward-error bound of a float32 merge that solves with the (Gram-like) matrix ``m``, whose
    entries and right-hand sides are sums of at most ``n`` products: κ₂(scaled m) · γ_{4n} (the γ_{3n+1} of the
    Cholesky backward error plus γ_n for forming the sums), whatever order the sums are taken in."""
    return jacobi_condition(m) * gamma(4 * n)


def assert_within(got, want, bound, what: str = ""):
    """``|got − want| <= bound`` elementwise (``bound`` broadcasts), with the worst element in the message."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    excess = np.abs(got - want) - np.broadcast_to(np.asarray(bound, np.float64), got.shape)
    i = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess[i] <= 0, (
        f"{what} |got − want| exceeds its rounding bound at {i}: got {got[i]!r}, want {want[i]!r}, "
        f"bound {np.broadcast_to(bound, got.shape)[i]!r}")
