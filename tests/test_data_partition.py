"""Tests for lorm_jax.data.partition (LORM_SPEC §10.3)."""
import numpy as np
import pytest

from lorm_jax.data import partition as P


def _labels(num_classes=10, per_class=100, shuffle_seed=None):
    y = np.repeat(np.arange(num_classes), per_class)
    if shuffle_seed is not None:
        y = y[np.random.default_rng(shuffle_seed).permutation(len(y))]
    return y


def _assert_exact_cover(parts, n):
    allx = np.concatenate(parts)
    assert len(allx) == n
    np.testing.assert_array_equal(np.sort(allx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates


@pytest.mark.parametrize("beta", [100.0, 0.5, 0.05])
def test_dirichlet_exact_cover(beta):
    y = _labels(shuffle_seed=1)
    parts = P.dirichlet_partition(y, 10, beta, np.random.default_rng(0), min_samples=0)
    assert len(parts) == 10
    _assert_exact_cover(parts, len(y))


def _mean_entropy(y, beta, seeds, k=10):
    ents, shares = [], []
    for s in seeds:
        parts = P.dirichlet_partition(y, k, beta, np.random.default_rng(s), min_samples=0)
        counts = P.client_label_counts(y, parts, 10)
        counts = counts[counts.sum(1) > 0].astype(float)
        q = counts / counts.sum(1, keepdims=True)
        ents.append(np.mean(-(q * np.log(np.where(q > 0, q, 1))).sum(1)))
        shares.append(np.mean(q.max(1)))
    return np.mean(ents), np.mean(shares)


def test_dirichlet_skew_grows_as_beta_shrinks():
    y = _labels()
    (e100, s100), (e05, s05), (e005, s005) = (_mean_entropy(y, b, range(8)) for b in (100.0, 0.5, 0.05))
    assert e100 > e05 > e005
    assert s100 < s05 < s005
    assert e100 > 0.95 * np.log(10)  # near iid
    assert s005 > 0.6  # clients dominated by one class


def test_dirichlet_min_samples_rule():
    y = _labels(num_classes=5, per_class=30)
    for s in range(10):
        parts = P.dirichlet_partition(y, 10, 0.3, np.random.default_rng(s), min_samples=6)
        assert min(len(p) for p in parts) >= 6
        _assert_exact_cover(parts, len(y))


def test_dirichlet_min_samples_zero_allows_empty_clients():
    y = _labels(num_classes=1, per_class=10)
    seen_empty = False
    for s in range(20):
        parts = P.dirichlet_partition(y, 10, 0.05, np.random.default_rng(s), min_samples=0)
        _assert_exact_cover(parts, 10)
        seen_empty |= any(len(p) == 0 for p in parts)
    assert seen_empty


def test_dirichlet_deterministic():
    y = _labels(shuffle_seed=3)
    a = P.dirichlet_partition(y, 10, 0.5, np.random.default_rng(42))
    b = P.dirichlet_partition(y, 10, 0.5, np.random.default_rng(42))
    c = P.dirichlet_partition(y, 10, 0.5, np.random.default_rng(43))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_dirichlet_matches_spec_algorithm():
    """One-try draw written out from the spec: per class (ascending), Dirichlet then per-sample Categorical."""
    y = np.array([3, 1, 3, 3, 1, 7, 7, 1, 3, 7, 1, 1])
    k, beta = 3, 0.7
    rng = np.random.default_rng(5)
    owner = np.empty(len(y), int)
    for c in np.unique(y):
        p = rng.dirichlet(np.full(k, beta))
        p[p < 1e-20] = 0
        p = p / p.sum()
        pos = np.flatnonzero(y == c)
        owner[pos] = rng.choice(k, size=len(pos), p=p)
    expected = [np.flatnonzero(owner == j) for j in range(k)]
    got = P.dirichlet_partition(y, k, beta, np.random.default_rng(5), min_samples=0)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


def test_dirichlet_max_tries_error_message():
    y = np.zeros(20, int)
    with pytest.raises(ValueError) as ei:
        P.dirichlet_partition(y, 10, 0.01, np.random.default_rng(0), min_samples=2, max_tries=3)
    msg = str(ei.value)
    for s in ("beta=0.01", "num_clients=10", "min_samples=2", "task size=20", "max_tries=3", "Lower min_samples"):
        assert s in msg, (s, msg)


def test_dirichlet_impossible_fails_fast():
    with pytest.raises(ValueError, match="impossible"):
        P.dirichlet_partition(np.zeros(50, int), 10, 1.0, np.random.default_rng(0), min_samples=6)
    with pytest.raises(ValueError, match="beta"):
        P.dirichlet_partition(np.zeros(50, int), 2, 0.0, np.random.default_rng(0))


def test_quantity_partition():
    y = _labels(num_classes=10, per_class=30, shuffle_seed=0)
    for s in range(5):
        parts = P.quantity_partition(y, 7, 3, np.random.default_rng(s))
        _assert_exact_cover(parts, len(y))
        counts = P.client_label_counts(y, parts, 10)
        assert np.all((counts > 0).sum(1) == 3)  # exactly k classes per client
        assert np.all((counts > 0).sum(0) >= 1)  # every class covered
        # each class is split near-evenly among its holders
        for c in range(10):
            held = counts[:, c][counts[:, c] > 0]
            assert held.max() - held.min() <= 1


def test_quantity_deterministic_and_errors():
    y = _labels(num_classes=6, per_class=10)
    a = P.quantity_partition(y, 4, 2, np.random.default_rng(1))
    b = P.quantity_partition(y, 4, 2, np.random.default_rng(1))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="classes_per_client=7"):
        P.quantity_partition(y, 4, 7, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no client"):
        P.quantity_partition(y, 2, 2, np.random.default_rng(0))


def test_dispatcher_and_iid():
    y = _labels(num_classes=4, per_class=25)
    rng = np.random.default_rng(0)
    parts = P.partition(y, 6, "iid", rng)
    _assert_exact_cover(parts, 100)
    assert {len(p) for p in parts} <= {16, 17}
    _assert_exact_cover(P.partition(y, 5, "dirichlet", rng, beta=1.0, min_samples=3), 100)
    _assert_exact_cover(P.partition(y, 5, "quantity", rng, classes_per_client=2), 100)
    with pytest.raises(ValueError, match="unknown partition mode"):
        P.partition(y, 5, "pathological", rng)
