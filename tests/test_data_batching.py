"""Tests for lorm_jax.data.batching."""
import math

import numpy as np
import pytest

from lorm_jax.data import batching as B


def _clients():
    rng = np.random.default_rng(0)
    perm = rng.permutation(200)
    sizes = [0, 1, 16, 17, 33]
    out, s = [], 0
    for n in sizes:
        out.append(np.sort(perm[s:s + n]))
        s += n
    return out


def test_client_schedule_epochs_and_padding():
    clients, bs, ep = _clients(), 16, 3
    idx, mask = B.client_schedule(clients, bs, ep, np.random.default_rng(1))
    steps = [ep * math.ceil(len(c) / bs) for c in clients]
    assert idx.shape == mask.shape == (5, max(steps), bs)
    assert idx.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(B.steps_per_client([len(c) for c in clients], bs, ep), steps)
    for k, c in enumerate(clients):
        real = mask[k].any(-1)
        assert real.sum() == steps[k] and np.all(real[:steps[k]])  # real steps first, then padding
        vals, cnt = np.unique(idx[k][mask[k]], return_counts=True)
        np.testing.assert_array_equal(vals, np.sort(c))
        assert np.all(cnt == ep)
        assert np.all(idx[k][~mask[k]] == 0)
        nb = math.ceil(len(c) / bs) if len(c) else 0
        for e in range(ep):  # each epoch is a permutation; only its last batch is partial
            block_m = mask[k, e * nb:(e + 1) * nb]
            np.testing.assert_array_equal(np.sort(idx[k, e * nb:(e + 1) * nb][block_m]), c)
            if nb:
                assert block_m[:-1].all() and block_m[-1].sum() == len(c) - (nb - 1) * bs
    assert not mask[0].any()  # empty client fully masked


def test_client_schedule_shuffles_and_is_deterministic():
    clients = [np.arange(40), np.arange(40, 64)]
    a = B.client_schedule(clients, 8, 2, np.random.default_rng(3))
    b = B.client_schedule(clients, 8, 2, np.random.default_rng(3))
    c = B.client_schedule(clients, 8, 2, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0][0, :5], a[0][0, 5:10])  # epochs use fresh permutations
    idx, mask = B.client_schedule(clients, 8, 1, np.random.default_rng(0), shuffle=False)
    np.testing.assert_array_equal(idx[0].ravel(), np.arange(40))


def test_forced_num_steps_and_all_empty():
    clients = [np.arange(5)]
    idx, mask = B.client_schedule(clients, 4, 1, np.random.default_rng(0), num_steps=7)
    assert idx.shape == (1, 7, 4) and mask[0].any(-1).sum() == 2
    idx2, mask2 = B.client_schedule(clients, 4, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(idx[:, :2], idx2)
    with pytest.raises(ValueError, match="num_steps"):
        B.client_schedule(clients, 4, 3, np.random.default_rng(0), num_steps=5)
    idx, mask = B.client_schedule([np.zeros(0, int), np.zeros(0, int)], 4, 2, np.random.default_rng(0))
    assert idx.shape == (2, 1, 4) and not mask.any()


def test_eval_schedule():
    idx, mask = B.eval_schedule(10, 4)
    assert idx.shape == (3, 4)
    np.testing.assert_array_equal(idx[mask], np.arange(10))
    assert mask.sum() == 10 and np.all(idx[~mask] == 0)
    idx, mask = B.eval_schedule(0, 4)
    assert idx.shape == (1, 4) and not mask.any()
