"""Tests for lorm_jax.data.tasks."""
import numpy as np
import pytest

from lorm_jax.data import tasks as T


def test_class_order():
    np.testing.assert_array_equal(T.class_order(5, None), np.arange(5))
    a, b = T.class_order(50, 1), T.class_order(50, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    assert not np.array_equal(a, np.arange(50))
    assert not np.array_equal(a, T.class_order(50, 2))


def test_equal_tasks_and_offsets():
    order = T.class_order(10, None)
    tasks = T.task_classes(10, 2, order)
    assert len(tasks) == 5
    np.testing.assert_array_equal(tasks[3], [6, 7])
    np.testing.assert_array_equal(T.task_offsets(tasks), [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(T.task_offsets([2, 3]), [0, 2, 5])


def test_unequal_tasks_cars_like():
    order = T.class_order(196, None)
    tasks = T.task_classes(196, [20] * 9 + [16], order)
    assert [len(t) for t in tasks] == [20] * 9 + [16]
    np.testing.assert_array_equal(np.concatenate(tasks), order)
    assert T.task_offsets(tasks)[-1] == 196


def test_task_errors():
    order = T.class_order(10, None)
    with pytest.raises(ValueError, match="classes_per_task=3.*num_classes=10"):
        T.task_classes(10, 3, order)
    with pytest.raises(ValueError, match="sum"):
        T.task_classes(10, [5, 4], order)
    with pytest.raises(ValueError, match="permutation"):
        T.task_classes(10, 5, np.arange(9))


def test_relabel_contiguous_ranges():
    order = T.class_order(12, 7)
    tasks = T.task_classes(12, [3, 5, 4], order)
    offs = T.task_offsets(tasks)
    y = np.random.default_rng(0).integers(0, 12, 500)
    yr = T.relabel(y, order)
    assert yr.dtype == np.int32
    np.testing.assert_array_equal(order[yr], y)  # inverse
    for t, cls in enumerate(tasks):
        idx = T.task_indices(yr, t, offs)
        np.testing.assert_array_equal(idx, np.flatnonzero(np.isin(y, cls)))
        assert np.all((yr[idx] >= offs[t]) & (yr[idx] < offs[t + 1]))
    np.testing.assert_array_equal(T.seen_class_mask(1, offs), np.arange(12) < 8)
    np.testing.assert_array_equal(T.task_of_class(offs), [0] * 3 + [1] * 5 + [2] * 4)
    with pytest.raises(ValueError):
        T.task_indices(yr, 3, offs)
