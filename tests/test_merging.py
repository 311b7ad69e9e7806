"""The closed-form merges against an independent float64 least-squares solution, and their defining property.

Tolerances: a float32 merge against the float64 solution is bounded by :func:`tests._numerics.solve_bound` (κ of the
Jacobi-scaled summed Gram times γ of the longest sum), computed from each test's own Grams; exact cases (small
integers, powers of two) compare exactly.

The merges' own tests (:class:`MergeVariantsTest`) run each merge both eagerly and under ``jax.jit``
(``chex.variants``): the bounds hold for any summation order, so they hold for the compiled program too.
"""
import itertools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from lorm_jax import lora, merging
from tests._numerics import U32, assert_within, gamma, solve_bound


def rel_err(x, ref):
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / max(np.linalg.norm(ref), 1e-300))


def make_problem(rng, K, d, n, kind, alpha=0.5, scales=None):
    """Client inputs X_k [n, d] and the Grams the merge sees, plus 'effective inputs' Z_k with Z_kᵀ Z_k = G̃_k."""
    xs = [rng.normal(size=(n, d)) * (scales if scales is not None else 1.0) for _ in range(K)]
    grams = np.stack([x.T @ x for x in xs])
    if kind == "full":
        used, eff = grams, xs
    elif kind == "diag":
        used = np.stack([np.diagonal(g) for g in grams])
        eff = [np.diag(np.sqrt(g)) for g in used]
    elif kind == "shrunk":
        used = np.stack([alpha * g + (1 - alpha) * np.diag(np.diagonal(g)) for g in grams])
        eff = [np.linalg.cholesky(g).T for g in used]
    else:
        raise ValueError(kind)
    return used, eff


def lstsq_A(a_k, eff):
    """argmin_A Σ_k ‖Z_k (A − A_k)ᵀ‖² by stacked min-norm least squares (float64)."""
    z = np.concatenate(eff)
    t = np.concatenate([zk @ ak.T for zk, ak in zip(eff, a_k)])
    return np.linalg.lstsq(z, t, rcond=None)[0].T


def lstsq_B(b_k, a, eff):
    """argmin_B Σ_k ‖Z_k Aᵀ (B − B_k)ᵀ‖² (float64)."""
    zs = [zk @ a.T for zk in eff]
    t = np.concatenate([z @ bk.T for z, bk in zip(zs, b_k)])
    return np.linalg.lstsq(np.concatenate(zs), t, rcond=None)[0].T


CASES = list(itertools.product([1, 3, 10], [1, 4], ["full", "diag", "shrunk"]))
NAMED_CASES = [(f"K{K}_r{r}_{kind}", K, r, kind) for K, r, kind in CASES]
KINDS = [(kind, kind) for kind in ("full", "diag", "shrunk")]


class MergeVariantsTest(chex.TestCase):
    """The merge functions against float64 references, each eager (``*_without_jit``) and jitted (``*_with_jit``)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED_CASES)
    def test_merge_A_matches_float64_lstsq(self, K, r, kind):
        rng = np.random.default_rng(K * 100 + r)
        d = 24
        grams, eff = make_problem(rng, K, d, n=3 * d, kind=kind)
        a_k = rng.normal(size=(K, r, d))
        got = self.variant(merging.merge_lora_A)(jnp.asarray(a_k, jnp.float32), jnp.asarray(grams, jnp.float32))
        assert got.dtype == jnp.float32 and got.shape == (r, d)
        # E = Σ_k A_k G_k sums K·d products; measured ≤ 5e-7 (2-core EPYC), bound ~1e-5 .. 2e-4 by κ and K
        assert rel_err(got, lstsq_A(a_k, eff)) < solve_bound(grams.sum(0), K * d)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED_CASES)
    def test_merge_B_matches_float64_lstsq(self, K, r, kind):
        rng = np.random.default_rng(K * 100 + r + 7)
        d_in, d_out = 20, 13
        grams, eff = make_problem(rng, K, d_in, n=3 * d_in, kind=kind)
        a = rng.normal(size=(r, d_in)) / np.sqrt(d_in)
        b_k = rng.normal(size=(K, d_out, r))
        got = self.variant(merging.merge_lora_B)(jnp.asarray(b_k, jnp.float32), jnp.asarray(a, jnp.float32),
                                                 jnp.asarray(grams, jnp.float32))
        assert got.dtype == jnp.float32 and got.shape == (d_out, r)
        # B solves with A ΣG Aᵀ [r, r], whose entries sum K·d_in² products (measured ≤ 4e-7)
        proj = a @ (grams.sum(0) if kind != "diag" else np.diag(grams.sum(0))) @ a.T
        assert rel_err(got, lstsq_B(b_k, a, eff)) < solve_bound(proj, K * d_in * d_in)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*KINDS)
    def test_regmean_matches_float64_lstsq(self, kind):
        rng = np.random.default_rng(3)
        K, d_in, d_out = 4, 16, 9
        grams, eff = make_problem(rng, K, d_in, n=40, kind=kind)
        w = rng.normal(size=(K, d_out, d_in))
        got = self.variant(merging.regmean)(jnp.asarray(w, jnp.float32), jnp.asarray(grams, jnp.float32))
        assert rel_err(got, lstsq_A(w, eff)) < solve_bound(grams.sum(0), K * d_in)  # measured ≤ 2e-7

    @chex.variants(with_jit=True, without_jit=True)
    def test_shrink_gram(self):
        shrink = self.variant(merging.shrink_gram)
        # exact: small integers times powers of two and 0.75, every product and sum is representable
        g = jnp.asarray(np.arange(9.0).reshape(3, 3))
        np.testing.assert_allclose(shrink(g, 0.25), 0.25 * g + 0.75 * jnp.diag(jnp.diagonal(g)))
        np.testing.assert_allclose(shrink(g, 0.0), jnp.diag(jnp.diagonal(g)))
        np.testing.assert_allclose(shrink(jnp.stack([g, 2 * g]), 1.0), jnp.stack([g, 2 * g]))
        with pytest.raises(ValueError, match="d, d"):  # a shape error, raised while tracing under jit
            shrink(jnp.ones((3, 4)), 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fedavg(self):
        fedavg = self.variant(merging.fedavg)
        x = jnp.asarray([[1.0, 2.0], [3.0, 6.0]])  # exact: (1·1 + 3·3) / 4 = 2.5 etc. are representable
        np.testing.assert_allclose(fedavg(x, jnp.asarray([1.0, 3.0])), [2.5, 5.0])
        np.testing.assert_allclose(fedavg(x), [2.0, 4.0])
        assert np.all(np.asarray(fedavg(x, jnp.zeros(2))) == 0)


def objective_A(a, b, a_k, eff):
    return sum(np.sum((zk @ (b @ a).T - zk @ (b @ ak).T) ** 2) for zk, ak in zip(eff, a_k))


def objective_B(b, a, b_k, eff):
    return sum(np.sum((zk @ (b @ a).T - zk @ (bk @ a).T) ** 2) for zk, bk in zip(eff, b_k))


@pytest.mark.parametrize("kind", [pytest.param("full", marks=pytest.mark.slow), "diag"])
def test_merged_factors_minimise_response_matching(kind):
    """Perturbing the merged factor in any direction never lowers Σ_k ‖X_k (B A)ᵀ − X_k (B A_k)ᵀ‖² (or B's analogue)."""
    rng = np.random.default_rng(11)
    K, r, d_in, d_out = 5, 3, 12, 10
    grams, eff = make_problem(rng, K, d_in, n=30, kind=kind)
    a_k, b = rng.normal(size=(K, r, d_in)), rng.normal(size=(d_out, r))
    a = np.asarray(merging.merge_lora_A(jnp.asarray(a_k, jnp.float32), jnp.asarray(grams, jnp.float32)), np.float64)
    b_k, a_shared = rng.normal(size=(K, d_out, r)), rng.normal(size=(r, d_in))
    bm = np.asarray(merging.merge_lora_B(jnp.asarray(b_k, jnp.float32), jnp.asarray(a_shared, jnp.float32),
                                         jnp.asarray(grams, jnp.float32)), np.float64)
    base_a, base_b = objective_A(a, b, a_k, eff), objective_B(bm, a_shared, b_k, eff)
    for _ in range(20):
        for eps in (1e-2, 1e-1):
            da, db = rng.normal(size=a.shape), rng.normal(size=bm.shape)
            # a float32 optimum is off by δ ≤ solve_bound·‖a‖, which can lower the objective below the exact
            # optimum's value by O(δ²) only, far under the 1e-6 relative slack; a wrong merge misses by O(eps²)
            assert objective_A(a + eps * da, b, a_k, eff) >= base_a * (1 - 1e-6)
            assert objective_B(bm + eps * db, a_shared, b_k, eff) >= base_b * (1 - 1e-6)


def test_zero_columns_give_zero_not_nan():
    """A feature no client saw (zero Gram row/column) gets 0 in that column, as the pseudo-inverse does."""
    rng = np.random.default_rng(5)
    K, r, d = 3, 2, 10
    xs = [rng.normal(size=(30, d)) for _ in range(K)]
    for x in xs:
        x[:, [2, 7]] = 0.0
    grams = np.stack([x.T @ x for x in xs])
    live = [i for i in range(d) if i not in (2, 7)]
    a_k = rng.normal(size=(K, r, d))
    want = np.einsum("krd,kde->re", a_k, grams) @ np.linalg.pinv(grams.sum(0), rcond=1e-15)
    for g in (grams, np.stack([np.diagonal(x) for x in grams])):
        got = np.asarray(merging.merge_lora_A(jnp.asarray(a_k, jnp.float32), jnp.asarray(g, jnp.float32)))
        assert np.all(np.isfinite(got))
        assert np.all(got[:, [2, 7]] == 0)
        if g.ndim == 3:  # κ on the nonzero (8-feature) block of ΣG
            assert rel_err(got, want) < solve_bound(grams.sum(0)[np.ix_(live, live)], K * d)


def test_rank_deficient_gram_equals_pinv_solution():
    """Σ G singular (fewer samples than features, collinear features): the minimum-norm pinv solution, finite."""
    rng = np.random.default_rng(6)
    K, r, d = 2, 3, 16
    xs = [rng.normal(size=(5, d)) for _ in range(K)]  # rank(Σ G) = 10 < 16
    xs[0][:, 4] = xs[0][:, 3]  # an exactly collinear pair on top
    grams = np.stack([x.T @ x for x in xs])
    a_k = rng.normal(size=(K, r, d))
    want = np.einsum("krd,kde->re", a_k, grams) @ np.linalg.pinv(grams.sum(0), rcond=1e-15)
    got = merging.merge_lora_A(jnp.asarray(a_k, jnp.float32), jnp.asarray(grams, jnp.float32))
    assert np.all(np.isfinite(np.asarray(got)))
    # the pseudo-inverse branch (eigh): its error is κ on the nonzero spectrum (the 10-dim data span, smallest
    # nonzero eigenvalue far above the cut-off) times γ; 1e-3 is above that bound for these draws (measured 6e-6)
    assert rel_err(got, want) < max(1e-3, solve_bound(grams.sum(0), K * d))
    b_k = rng.normal(size=(K, 7, r))
    a_low = np.concatenate([rng.normal(size=(2, d)), np.zeros((1, d))])  # rank-deficient A ⇒ A ΣG Aᵀ singular
    proj = np.einsum("rd,kde,se->krs", a_low, grams, a_low)
    want_b = np.einsum("kor,krs->os", b_k, proj) @ np.linalg.pinv(proj.sum(0), rcond=1e-15)
    got_b = merging.merge_lora_B(jnp.asarray(b_k, jnp.float32), jnp.asarray(a_low, jnp.float32),
                                 jnp.asarray(grams, jnp.float32))
    assert np.all(np.isfinite(np.asarray(got_b)))
    assert rel_err(got_b, want_b) < max(1e-3, solve_bound(proj.sum(0), K * d * d))  # measured 1e-7


def test_all_zero_grams_give_zeros():
    a_k = jnp.ones((3, 2, 5))
    for g in (jnp.zeros((3, 5)), jnp.zeros((3, 5, 5))):
        assert np.all(np.asarray(merging.merge_lora_A(a_k, g)) == 0)


def test_single_client_is_identity_when_gram_invertible():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 12))
    a = rng.normal(size=(1, 4, 12)).astype(np.float32)
    for g in (x.T @ x, np.diagonal(x.T @ x)):
        got = merging.merge_lora_A(jnp.asarray(a), jnp.asarray(g[None], jnp.float32))
        assert rel_err(got, a[0].astype(np.float64)) < solve_bound(g, 12)  # (A G) G⁻¹; measured 6e-7


def test_badly_scaled_features_stay_accurate():
    """Feature scales from 1e-3 to 1e3: Jacobi scaling keeps the float32 Cholesky path accurate."""
    rng = np.random.default_rng(9)
    scales = np.logspace(-3, 3, 20)
    grams, eff = make_problem(rng, 4, 20, n=60, kind="full", scales=scales)
    a_k = rng.normal(size=(4, 2, 20))
    got = merging.merge_lora_A(jnp.asarray(a_k, jnp.float32), jnp.asarray(grams, jnp.float32))
    # Jacobi scaling removes the 1e-3 .. 1e3 scales, so the bound is κ of the scaled Gram (measured 3e-7)
    assert rel_err(got, lstsq_A(a_k, eff)) < solve_bound(grams.sum(0), 4 * 20)


def test_jit_and_vmap_over_layers():
    rng = np.random.default_rng(10)
    a = jnp.asarray(rng.normal(size=(6, 3, 2, 8)), jnp.float32)  # 6 layers × 3 clients
    g = jnp.asarray(rng.uniform(0.1, 2.0, size=(6, 3, 8)), jnp.float32)
    gf = jnp.einsum("lkd,de->lkde", g, jnp.eye(8))
    batched = jax.jit(jax.vmap(merging.merge_lora_A))(a, g)
    batched_full = jax.jit(jax.vmap(merging.merge_lora_A))(a, gf)
    for i in range(6):
        # diagonal merge, per entry Σ_k a_k g_k / Σ_k g_k: the vmapped and the single call may add the 3 terms in
        # another order, 2 γ_3 of the absolute terms apart, plus the division (u); the full-Gram path adds the
        # Cholesky solve of a diagonal matrix (a few more roundings: γ_{3·8+1})
        want = merging.merge_lora_A(a[i], g[i])
        abs_terms = np.einsum("krd,kd->rd", np.abs(a[i]), g[i]) / np.asarray(g[i]).sum(0)
        assert_within(batched[i], want, 2 * gamma(3) * abs_terms + U32 * np.abs(want), "vmapped diagonal merge:")
        assert_within(batched_full[i], batched[i], 4 * gamma(3 * 8 + 4) * abs_terms, "full vs diagonal:")



def test_accelerators_sum_over_clients_in_a_loop_that_equals_the_cpu_matmul():
    """``Σ_k X_k Y_k``: the CPU forms it as one matmul (the head's RegMean sums) or one einsum (``Σ_k B_k A_k G_k``),
    accelerators as a loop over k (:func:`merging.sum_of_products`, for XLA's TPU compile time). Both add the same
    K·n products per entry in some order: 2 γ_{K·n} of the absolute terms apart."""
    rng = np.random.default_rng(12)
    for k, m, n, p in ((4, 6, 16, 16), (3, 9, 2, 24)):  # a head's W_k G_k; rank-2 B_k (A_k G_k)
        x = jnp.asarray(rng.normal(size=(k, m, n)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(k, n, p)), jnp.float32)
        looped = jax.jit(merging.sum_of_products)(x, y)
        cpu = jnp.einsum("kmn,knp->mp", x, y, precision=jax.lax.Precision.HIGHEST)
        abs_terms = np.einsum("kmn,knp->mp", np.abs(x), np.abs(y))
        assert_within(looped, cpu, 2 * gamma(k * n) * abs_terms, "loop over k:")
    g = jnp.asarray(rng.uniform(0.1, 2.0, size=(3, 16)), jnp.float32)
    e, _ = merging.regmean_lowrank_system(jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32),
                                          jnp.asarray(rng.normal(size=(3, 2, 16)), jnp.float32), g)
    assert e.shape == (5, 16)
    for platform, loops in (("cpu", False), ("tpu", True)):  # the branch each platform lowers
        text = jax.jit(merging.regmean_lowrank_system).trace(
            jnp.zeros((3, 5, 2)), jnp.zeros((3, 2, 16)), g).lower(lowering_platforms=(platform,)).as_text()
        assert ("while" in text) == loops, platform

# the fast lane runs A with full Grams and B with diagonal ones; the other two in the full suite
@pytest.mark.parametrize("factor, gram_kind", [("A", "full"), ("B", "diag"),
                                               pytest.param("A", "diag", marks=pytest.mark.slow),
                                               pytest.param("B", "full", marks=pytest.mark.slow)])
def test_merge_lora_tree_matches_per_layer(factor, gram_kind):
    rng = np.random.default_rng(12)
    shapes = {"b0/qkv": (12, 4), "b0/fc1": (8, 4), "b0/fc2": (4, 8), "b1/qkv": (12, 4), "b1/fc1": (8, 4)}
    K = 3
    clients = [lora.init(jax.random.PRNGKey(0), shapes, rank=2) for _ in range(K)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *clients)
    stacked = jax.tree.map(lambda x: x + (0.1 * rng.normal(size=x.shape)).astype(np.float32) if factor else x, stacked)
    if factor == "A":  # the frozen factor is shared
        stacked = {p: {"A": f["A"], "B": jnp.broadcast_to(f["B"][:1], f["B"].shape)} for p, f in stacked.items()}
    else:
        stacked = {p: {"A": jnp.broadcast_to(f["A"][:1], f["A"].shape), "B": f["B"]} for p, f in stacked.items()}
    grams = {}
    for p, (d_out, d_in) in shapes.items():
        x = rng.normal(size=(K, 20, d_in))
        full = np.einsum("kni,knj->kij", x, x)
        grams[p] = jnp.asarray(full if gram_kind == "full" else np.einsum("kii->ki", full), jnp.float32)
    merged = jax.jit(lambda c, g: merging.merge_lora_tree(c, g, factor))(stacked, grams)
    assert sorted(merged) == sorted(shapes)
    for p, f in stacked.items():
        if factor == "A":
            want = merging.merge_lora_A(f["A"], grams[p])
            np.testing.assert_array_equal(merged[p]["B"], f["B"][0])
        else:
            want = merging.merge_lora_B(f["B"], f["A"][0], grams[p])
            np.testing.assert_array_equal(merged[p]["A"], f["A"][0])
        # the tree merges same-shape layers together, the reference one by one: both within the solve bound of
        # the exact merge (measured usage 2 % of the old rtol 1e-5)
        g_sum = np.asarray(grams[p], np.float64).sum(0)
        m = g_sum if factor == "A" else np.asarray(f["A"][0], np.float64) @ (
            g_sum if g_sum.ndim == 2 else np.diag(g_sum)) @ np.asarray(f["A"][0], np.float64).T
        d_in = shapes[p][1]
        assert rel_err(merged[p][factor], np.asarray(want, np.float64)) < 2 * solve_bound(m, K * d_in * d_in)


def test_solve_gram_tree_cross_task():
    """Cross-task RegMean from running sums: S_WG G^+ with S_WG = Σ_τ ΔW_τ G_τ, G = Σ_τ G_τ."""
    rng = np.random.default_rng(13)
    deltas = rng.normal(size=(3, 5, 6))
    g = rng.uniform(0.5, 2.0, size=(3, 6))
    s_wg = np.einsum("tod,td->od", deltas, g)
    got = merging.solve_gram_tree({"l": jnp.asarray(s_wg, jnp.float32)}, {"l": jnp.asarray(g.sum(0), jnp.float32)})
    want = np.asarray(merging.regmean(jnp.asarray(deltas, jnp.float32), jnp.asarray(g, jnp.float32)))
    # diagonal: per entry Σ_τ ΔW_τ g_τ / Σ_τ g_τ, formed in float64 here and in float32 by regmean (γ_3 of the
    # absolute terms each, plus the divisions); elementwise rtol was unsafe where the terms cancel
    abs_terms = np.einsum("tod,td->od", np.abs(deltas), g) / g.sum(0)
    assert_within(got["l"], want, 4 * gamma(3 + 2) * abs_terms)


def test_solve_systems_groups_full_grams_and_divides_diagonal_ones_in_place():
    """Full Grams of one shape are solved as one padded stack; diagonal ones are the column-wise division of each
    layer, exactly :func:`merging.solve_gram` of that layer (same ops per entry, nothing stacked)."""
    rng = np.random.default_rng(5)
    systems = {}
    for p, (m, d) in {"a": (3, 6), "b": (5, 6), "c": (4, 9)}.items():  # diagonal: a and b share d, not m
        systems[p] = (jnp.asarray(rng.normal(size=(m, d)), jnp.float32),
                      jnp.asarray(rng.uniform(0.5, 2, d), jnp.float32))
    for p, m in {"f": 2, "g": 4}.items():  # full, one shape: stacked, f padded to 4 rows
        x = rng.normal(size=(20, 5))
        systems[p] = (jnp.asarray(rng.normal(size=(m, 5)), jnp.float32), jnp.asarray(x.T @ x, jnp.float32))
    got = merging.solve_systems(systems)
    for p in "abc":
        np.testing.assert_array_equal(got[p], merging.solve_gram(*systems[p]))
    for p in "fg":
        e, g = (np.asarray(x, np.float64) for x in systems[p])
        assert got[p].shape == e.shape
        assert rel_err(got[p], e @ np.linalg.inv(g)) < solve_bound(g, 20)


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not match"):
        merging.merge_lora_A(jnp.ones((3, 2, 5)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="merge_lora_B"):
        merging.merge_lora_B(jnp.ones((3, 4, 2)), jnp.ones((3, 5)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="factor"):
        merging.merge_lora_tree({}, {}, "C")


def test_float64_option():
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            merging.merge_lora_A(jnp.ones((2, 1, 3)), jnp.ones((2, 3)), dtype=jnp.float64)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_regmean_lowrank_equals_regmean_of_products(kind):
    rng = np.random.default_rng(14)
    T, d_out, r, d_in = 3, 7, 2, 9
    b, a = rng.normal(size=(T, d_out, r)), rng.normal(size=(T, r, d_in))
    grams, _ = make_problem(rng, T, d_in, n=30, kind=kind)
    want = merging.regmean(jnp.asarray(np.einsum("tor,trd->tod", b, a), jnp.float32), jnp.asarray(grams, jnp.float32))
    got = merging.regmean_lowrank(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32),
                                  jnp.asarray(grams, jnp.float32))
    # low-rank route (Σ B_τ (A_τ G_τ)) vs the products first: two float32 orders of the same sums, each within the
    # solve bound of the exact RegMean
    assert rel_err(got, np.asarray(want, np.float64)) < 2 * solve_bound(grams.sum(0), T * r * d_in)



# ----------------------------------------------------------------------------------------------------------------------
# Merges under jax.vmap: the eigh fallback stays a real branch (issue 16).

EPS32 = float(np.finfo(np.float32).eps)


def _layer_stack(rng, kinds, K=3, r=2, d=12, d_out=5):
    """Per layer (kind "ok": 4d samples per client, kind "singular": d//4 samples per client, so Σ G has rank
    K·d/4 < d): A [L, K, r, d], B [L, K, d_out, r], W [L, K, d_out, d], Grams [L, K, d, d] and cond of Σ G on its range
    (float64)."""
    grams, conds = [], []
    for kind in kinds:
        n = 4 * d if kind == "ok" else d // 4
        x = rng.normal(size=(K, n, d))
        g = np.einsum("kni,knj->kij", x, x)
        w = np.linalg.eigvalsh(g.sum(0))
        conds.append(w[-1] / w[w > 1e-9 * w[-1]].min())
        grams.append(g)
    L = len(kinds)
    as_ = lambda a: jnp.asarray(a, jnp.float32)
    return (as_(rng.normal(size=(L, K, r, d))), as_(rng.normal(size=(L, K, d_out, r))),
            as_(rng.normal(size=(L, K, d_out, d))), as_(np.stack(grams)), max(conds))


@pytest.mark.parametrize("kinds", [pytest.param(("ok",) * 4, marks=pytest.mark.slow),
                                   pytest.param(("singular",) * 3, marks=pytest.mark.slow),
                                   pytest.param(("ok", "singular", "ok", "singular", "ok"), marks=pytest.mark.slow)])
def test_vmapped_merges_equal_unbatched(kinds):
    """jit(vmap(merge)) over a stack of layers = the merge of each layer alone, for healthy and singular Grams.

    Both take the same branch per layer (Cholesky or eigh pseudo-inverse, decided by the same pivot / inverse-iteration
    test) and run the same algorithm; they differ only in how XLA rounds batched vs unbatched matmuls and solves: a
    relative perturbation of ~K·eps of E and Σ G, amplified by the condition number of Σ G on its range (the
    pseudo-inverse's sensitivity), hence the tolerance 10·K·eps·cond. Nested vmaps fold into one stack.
    """
    rng = np.random.default_rng(len(kinds))
    a, b, w, g, cond = _layer_stack(rng, kinds)
    K = g.shape[1]
    tol = 10 * K * EPS32 * cond
    assert tol < 1e-2, cond  # the test data is meant to be far from the pseudo-inverse cut-off
    lowrank = lambda b_, a_, g_: merging.regmean_lowrank(b_, a_, g_)
    fns = {"A": (merging.merge_lora_A, (a, g)),
           "B": (lambda b_, a_, g_: merging.merge_lora_B(b_, a_[0], g_), (b, a, g)),
           "regmean": (merging.regmean, (w, g)), "lowrank": (lowrank, (b, a, g))}
    for name, (fn, args) in fns.items():
        batched = np.asarray(jax.jit(jax.vmap(fn))(*args))
        for i in range(len(kinds)):
            alone = np.asarray(fn(*[x[i] for x in args]))
            assert np.all(np.isfinite(batched[i]))
            err = np.max(np.abs(batched[i] - alone)) / np.max(np.abs(alone))
            assert err < tol, (name, i, kinds[i], err, tol)
    nested = jax.jit(jax.vmap(jax.vmap(merging.merge_lora_A)))(a[None], g[None])[0]
    flat = jax.jit(jax.vmap(merging.merge_lora_A))(a, g)
    assert np.max(np.abs(np.asarray(nested - flat))) <= tol * np.max(np.abs(np.asarray(flat)))
    sick = [float(merging.gram_health(merging.client_sum(g[i]))["pinv"]) for i in range(len(kinds))]
    assert sick == [float(k == "singular") for k in kinds]  # the data exercises both branches as intended


def _count_pinv_calls(monkeypatch, request):
    """Make every evaluation of the eigh pseudo-inverse fallback report itself through a jax.debug.callback."""
    calls = []
    original = merging._pinv_solve

    def counted(e, g):
        jax.debug.callback(lambda: calls.append(1))
        return original(e, g)
    monkeypatch.setattr(merging, "_pinv_solve", counted)
    jax.clear_caches()  # traces made before the patch (custom_vmap bodies are cached) must not be reused
    request.addfinalizer(jax.clear_caches)  # nor the patched ones after it
    return calls


def test_vmapped_healthy_merges_never_evaluate_eigh(monkeypatch, request):
    """Under vmap the fallback runs only for layers that need it: never for healthy Grams, once per singular layer.

    (A plain lax.cond becomes a select under vmap and evaluates eigh for every layer: this test counts that.)"""
    calls = _count_pinv_calls(monkeypatch, request)
    a, _, _, g, _ = _layer_stack(np.random.default_rng(0), ("ok", "ok", "singular", "ok", "ok"))
    merge = jax.jit(jax.vmap(merging.merge_lora_A))
    healthy = jnp.concatenate([g[:2], g[3:]])
    jax.block_until_ready(merge(jnp.concatenate([a[:2], a[3:]]), healthy))
    jax.effects_barrier()
    assert len(calls) == 0
    jax.block_until_ready(merge(a, g))
    jax.effects_barrier()
    assert len(calls) == 1  # only the singular layer
    # and the eigh is inside conditionals only: the traced program holds no unconditional eigh
    jaxpr = jax.make_jaxpr(jax.vmap(merging.merge_lora_A))(a, g)
    assert "eigh" in str(jaxpr) and not _unconditional(jaxpr.jaxpr, "eigh")


def test_batched_stack_solver_evaluates_eigh_only_for_failing_layers(monkeypatch, request):
    """The GPU/TPU stack solver (one batched Cholesky, then eigh only if some layer failed), run here on CPU."""
    calls = _count_pinv_calls(monkeypatch, request)
    _, _, _, g, cond = _layer_stack(np.random.default_rng(1), ("ok", "singular", "ok"))
    gram = jax.vmap(merging.client_sum)(g)
    e = jnp.einsum("lrd,lde->lre", jnp.asarray(np.random.default_rng(2).normal(size=(3, 2, 12)), jnp.float32), gram)
    solve = jax.jit(merging._solve_stack_batched)
    healthy = jax.block_until_ready(solve(e[::2], gram[::2]))
    jax.effects_barrier()
    assert len(calls) == 0
    mixed = jax.block_until_ready(solve(e, gram))
    jax.effects_barrier()
    assert len(calls) == 1
    looped = merging._solve_stack_looped(e, gram)  # the CPU path: same branches, same answers up to rounding
    atol = 10 * g.shape[1] * EPS32 * cond * float(jnp.max(jnp.abs(looped)))  # as in the vmapped == unbatched test
    np.testing.assert_allclose(mixed, looped, rtol=0, atol=atol)
    np.testing.assert_allclose(healthy, looped[::2], rtol=0, atol=atol)


@pytest.mark.parametrize("d", [8, merging.CPU_UNROLL_MIN_DIM])
def test_cpu_stack_solver_loops_small_systems_and_unrolls_large_ones(d):
    """On CPU small systems (LoRM's r×r B merges) are solved in one rolled loop, which compiles once whatever the stack
    length, and systems of size >= CPU_UNROLL_MIN_DIM unrolled; both give what each system alone gives, up to the
    rounding of the same ops compiled in another program (Cholesky's backward error, amplified by cond(G))."""
    rng = np.random.default_rng(d)
    x = rng.normal(size=(3, 2 * d, d))
    gram = jnp.asarray(np.einsum("lni,lnj->lij", x, x), jnp.float32)
    e = jnp.asarray(rng.normal(size=(3, 4, d)), jnp.float32)
    eqns = jax.make_jaxpr(merging._solve_stack_looped)(e, gram).jaxpr.eqns
    # a loop over the systems: a scan whose body factorises (the conditioning estimate has a loop of its own)
    looped = any(q.primitive.name == "scan" and "cholesky" in str(q.params["jaxpr"]) for q in eqns)
    assert looped == (d < merging.CPU_UNROLL_MIN_DIM)
    looped = np.asarray(jax.jit(merging._solve_stack_looped)(e, gram))
    alone = np.stack([np.asarray(jax.jit(merging._solve_one)(e[i], gram[i])) for i in range(3)])
    np.testing.assert_allclose(looped, alone, rtol=0, atol=10 * d * EPS32 * np.max(np.abs(alone)) * float(
        max(np.linalg.cond(np.asarray(g, np.float64)) for g in gram)))


def _unconditional(jaxpr, primitive: str) -> bool:
    """Whether ``primitive`` is reached in ``jaxpr`` without passing through a ``cond`` (sub-jaxprs searched)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        if eqn.primitive.name == "cond":
            continue
        for sub in _jaxprs_in(eqn.params):
            if _unconditional(sub, primitive):
                return True
    return False


def _jaxprs_in(params: dict):
    """The jaxprs among an equation's parameters (jax.extend.core.jaxprs_in_params, which jax < 0.10 lacks)."""
    core = jax.extend.core
    for value in params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, core.Jaxpr):
                yield x


@pytest.mark.parametrize("d", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_singular_grams_with_large_pivots_take_the_pseudo_inverse(d):
    """Σ G of d − 1 samples has rank d − 1, yet float32 Cholesky can leave every squared pivot above SINGULAR_PIVOT
    (on the development machine d = 32, seed 4 gave 4.6e-5 and a solution 5.6× off the minimum-norm one). The
    inverse-iteration estimate of λ_min catches it, so the answer is the pinv solution. Tolerance: the float32
    pseudo-inverse's error ~ cond·eps with cond = λ_max / λ_min on the range, times 10."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(d - 1, d))
        gram = x.T @ x
        e = rng.normal(size=(3, d)) @ gram
        want = e @ np.linalg.pinv(gram, rcond=1e-15)
        w = np.linalg.eigvalsh(gram)
        cond = w[-1] / w[1]  # w[0] ≈ 0 is the null direction
        got = merging.solve_gram(jnp.asarray(e, jnp.float32), jnp.asarray(gram, jnp.float32))
        assert float(merging.gram_health(jnp.asarray(gram, jnp.float32))["pinv"]) == 1
        assert rel_err(got, want) < 10 * cond * EPS32, (seed, rel_err(got, want), cond)
