"""Property tests (hypothesis) of the closed-form merges: random shapes, scales 1e-6 .. 1e6, rank-deficient and
all-zero Grams, full and diagonal.

Properties: outputs are finite; reordering the clients changes nothing that the data can see; with one client and an
invertible Gram every merge returns that client's matrix; the merge solves its normal equations on the data span.
Comparisons are made on responses ``W ΣG`` (what the objective sees), scaled by ``max|W_k| · max|ΣG|``: on a rank-
deficient Gram the component of ``W`` outside the data span is not determined, and a reordered float32 sum may move
a borderline eigenvalue across the pseudo-inverse cut-off.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorm_jax import merging

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def problems(draw, invertible=False, single=False):
    """(K, d, d_out, r, scale of the Grams, scale of the weights, diagonal?, numpy rng, samples per client)."""
    # few distinct shapes: every new shape costs compilations, and the properties do not depend on the sizes
    k = 1 if single else draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([1, 4]))
    d_out = 2
    r = draw(st.integers(1, min(2, d)))
    g_scale = 10.0 ** draw(st.integers(-6, 6))
    w_scale = 10.0 ** draw(st.integers(-6, 6))
    diagonal = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    # samples behind each client's Gram: 0 (no data), < d (rank-deficient) or >= d; invertible: 3d for one client
    n = [3 * d + 2] * k if invertible else [draw(st.integers(0, d + 2)) for _ in range(k)]
    return k, d, d_out, r, g_scale, w_scale, diagonal, np.random.default_rng(seed), n


def make_grams(rng, d, n, scale, diagonal):
    """Client Grams ``scale · X_kᵀ X_k / n_k`` (full [K, d, d]) or their diagonals with some dead features ([K, d])."""
    if diagonal:
        g = rng.uniform(0.5, 2.0, (len(n), d)) * (rng.uniform(size=(len(n), d)) < 0.8) * np.asarray(n)[:, None] > 0
        return jnp.asarray(scale * g * rng.uniform(0.5, 2.0, (len(n), d)), jnp.float32)
    grams = []
    for n_k in n:
        x = rng.normal(size=(n_k, d))
        grams.append(scale * x.T @ x / max(n_k, 1))
    return jnp.asarray(np.stack(grams), jnp.float32)


def dense(g):
    g = np.asarray(g, np.float64)
    return np.stack([np.diag(x) for x in g]) if g.ndim == 2 else g


def response_gap(w1, w2, gram_sum_dense, scale):
    """``max |(W1 − W2) ΣG| / scale`` in float64."""
    return np.max(np.abs((np.asarray(w1, np.float64) - np.asarray(w2, np.float64)) @ gram_sum_dense)) / scale


def check_finite(*xs):
    for x in xs:
        assert np.all(np.isfinite(np.asarray(x))), x


@pytest.mark.slow
@SETTINGS
@given(problems())
def test_regmean_and_merge_a_finite_permutation_invariant_and_exact_on_the_data_span(p):
    k, d, d_out, r, g_scale, w_scale, diagonal, rng, n = p
    grams = make_grams(rng, d, n, g_scale, diagonal)
    w = jnp.asarray(w_scale * rng.normal(size=(k, d_out, d)), jnp.float32)
    a = jnp.asarray(w_scale * rng.normal(size=(k, r, d)), jnp.float32)
    merged_w, merged_a = merging.regmean(w, grams), merging.merge_lora_A(a, grams)
    check_finite(merged_w, merged_a)
    assert merged_w.shape == (d_out, d) and merged_a.shape == (r, d) and merged_w.dtype == jnp.float32
    g_sum = dense(grams).sum(0)
    scale = w_scale * max(np.max(np.abs(g_sum)), 1e-30)
    perm = rng.permutation(k)
    assert response_gap(merging.regmean(w[perm], grams[perm]), merged_w, g_sum, scale) < 1e-3
    assert response_gap(merging.merge_lora_A(a[perm], grams[perm]), merged_a, g_sum, scale) < 1e-3
    # normal equations: W ΣG = Σ W_k G_k (E lies in the span of ΣG, so the pseudo-inverse solution satisfies them)
    e = np.einsum("kod,kde->oe", np.asarray(w, np.float64), dense(grams))
    assert np.max(np.abs(np.asarray(merged_w, np.float64) @ g_sum - e)) / scale < 1e-3


@pytest.mark.slow
@SETTINGS
@given(problems())
def test_merge_b_finite_and_permutation_invariant(p):
    k, d, d_out, r, g_scale, w_scale, diagonal, rng, n = p
    grams = make_grams(rng, d, n, g_scale, diagonal)
    a = jnp.asarray(rng.normal(size=(r, d)) / np.sqrt(d), jnp.float32)
    b = jnp.asarray(w_scale * rng.normal(size=(k, d_out, r)), jnp.float32)
    merged = merging.merge_lora_B(b, a, grams)
    check_finite(merged)
    assert merged.shape == (d_out, r) and merged.dtype == jnp.float32
    # B is solved against the projected Gram A ΣG Aᵀ [r, r]: compare responses there
    projected = np.asarray(a, np.float64) @ dense(grams).sum(0) @ np.asarray(a, np.float64).T
    scale = w_scale * max(np.max(np.abs(projected)), 1e-30)
    perm = rng.permutation(k)
    assert response_gap(merging.merge_lora_B(b[perm], a, grams[perm]), merged, projected, scale) < 1e-3


@pytest.mark.slow
@SETTINGS
@given(problems(invertible=True, single=True))
def test_one_client_with_invertible_gram_returns_its_own_matrices(p):
    _, d, d_out, r, g_scale, w_scale, diagonal, rng, n = p
    grams = make_grams(rng, d, n, g_scale, diagonal=False)
    if diagonal:  # strictly positive diagonal: invertible
        grams = jnp.asarray(g_scale * rng.uniform(0.5, 2.0, (1, d)), jnp.float32)
    w = jnp.asarray(w_scale * rng.normal(size=(1, d_out, d)), jnp.float32)
    a = jnp.asarray(w_scale * rng.normal(size=(1, r, d)), jnp.float32)
    b = jnp.asarray(w_scale * rng.normal(size=(1, d_out, r)), jnp.float32)
    a_shared = jnp.asarray(np.linalg.qr(rng.normal(size=(d, r)))[0].T, jnp.float32)  # orthonormal rows: full rank
    tol = dict(rtol=1e-3, atol=1e-3 * w_scale)
    np.testing.assert_allclose(merging.regmean(w, grams), w[0], **tol)
    np.testing.assert_allclose(merging.merge_lora_A(a, grams), a[0], **tol)
    np.testing.assert_allclose(merging.merge_lora_B(b, a_shared, grams), b[0], **tol)


@SETTINGS
@given(problems())
def test_solve_gram_is_finite_and_solves_on_the_span(p):
    k, d, d_out, r, g_scale, w_scale, diagonal, rng, n = p
    gram = merging.client_sum(make_grams(rng, d, n, g_scale, diagonal))
    x_true = w_scale * rng.normal(size=(d_out, d))
    g = dense(gram[None])[0]
    e = jnp.asarray(x_true @ g, jnp.float32)  # a right-hand side in the span of G
    x = merging.solve_gram(e, gram)
    check_finite(x)
    scale = w_scale * max(np.max(np.abs(g)), 1e-30)
    assert np.max(np.abs(np.asarray(x, np.float64) @ g - np.asarray(e, np.float64))) / scale < 1e-3
    health = merging.gram_health(gram)
    check_finite(*health.values())
    assert 0 <= float(health["min_pivot"]) <= 1 + 1e-5


def test_all_zero_grams_give_zeros_not_nan():
    zeros_full, zeros_diag = jnp.zeros((3, 4, 4)), jnp.zeros((3, 4))
    w = jnp.ones((3, 2, 4))
    for grams in (zeros_full, zeros_diag):
        np.testing.assert_array_equal(merging.regmean(w, grams), 0)
        np.testing.assert_array_equal(merging.merge_lora_B(jnp.ones((3, 2, 1)), jnp.ones((1, 4)), grams), 0)
