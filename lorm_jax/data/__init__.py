"""Data pipeline for federated class-incremental learning.

* :mod:`.datasets`  host-side numpy datasets (registry ``load(name, **options)``).
* :mod:`.tasks`     class orders, task splits, relabelling to contiguous logit ranges.
* :mod:`.partition` Dirichlet / label-quantity / iid client partitions of a task (LORM_SPEC §10.3).
* :mod:`.batching`  per-client minibatch schedules, training lanes and packed passes for the vmapped programs.
* :mod:`.augment`   jit/vmap-friendly image transforms (LORM_SPEC §10.4).
* :mod:`.inputs`    model inputs: encode the host arrays once, gather and transform examples on device.
  augment and inputs import JAX; the other modules are numpy-only.
"""
from . import augment, batching, datasets, inputs, partition, tasks

try:
    from . import tfds_data  # registers the "tfds/<name>" paper datasets; tensorflow-datasets/grain load lazily
except ImportError:  # pragma: no cover
    tfds_data = None
from .batching import (
    client_schedule,
    eval_schedule,
    lane_schedule,
    lane_steps,
    pack_lanes,
    pack_steps,
    packed_schedule,
    step_sizes,
    steps_per_client,
)
from .datasets import (
    ArrayDataset,
    DatasetFormatError,
    DatasetNotFoundError,
    available,
    load,
    load_with_fallback,
    register,
    select_classes,
    stratified_split,
    subsample_per_class,
)

# NB: the dispatcher function is NOT re-exported, so that ``lorm_jax.data.partition`` stays the module;
# call it as ``lorm_jax.data.partition.partition(...)``.
from .partition import client_label_counts, dirichlet_partition, iid_partition, quantity_partition
from .tasks import class_order, relabel, seen_class_mask, task_classes, task_indices, task_of_class, task_offsets

__all__ = [
    "augment", "batching", "datasets", "inputs", "partition", "tasks",
    "ArrayDataset", "DatasetFormatError", "DatasetNotFoundError", "available", "load", "load_with_fallback", "register",
    "select_classes", "stratified_split", "subsample_per_class",
    "class_order", "task_classes", "relabel", "task_offsets", "task_indices", "seen_class_mask", "task_of_class",
    "dirichlet_partition", "quantity_partition", "iid_partition", "client_label_counts",
    "client_schedule", "eval_schedule", "lane_schedule", "lane_steps", "pack_lanes", "pack_steps", "packed_schedule",
    "step_sizes", "steps_per_client",
]
