"""The paper's image datasets (LORM_SPEC §10.2) from prepared TFDS copies, read with grain and no TensorFlow.

    from lorm_jax import data
    ds = data.load("tfds/cifar100", data_dir="/data/tensorflow_datasets", image_size=224)

Registry names (registered into :mod:`lorm_jax.data.datasets` when this module is imported):

=========================== ======================== ========= ======================================================
name                        TFDS source split(s)     classes   train / test used here
=========================== ======================== ========= ======================================================
``tfds/cifar100``           train, test              100       official train / test (50,000 / 10,000)
``tfds/imagenet_r``         test (only split)        200       **ours**: stratified 80/20 of the 30,000 images
``tfds/imagenet_a``         test (only split)        200       **ours**: stratified 80/20 of the 7,500 images
``tfds/caltech_birds2011``  train, test              200       official train / test (5,994 / 5,794)
``tfds/cars196``            train, test              196       official train / test (8,144 / 8,041)
``tfds/eurosat/rgb``        train (only split)       10        **ours**: stratified 80/20 of the 27,000 images
=========================== ======================== ========= ======================================================

Reading (never downloads, never prepares): ``data_dir`` must hold a copy prepared in the **ArrayRecord** format
(``tfds build <name> --file_format=array_record --data_dir=<data_dir>``, run anywhere with TensorFlow installed, then
copy the folder). Records are read with ``tfds.data_source`` + ``grain.MapDataset`` (images are decoded by PIL), so
TensorFlow is not needed at run time. A missing or TFRecord-format copy raises :class:`DatasetNotFoundError` naming the
folder and the command that fixes it. ``data_dir=None`` uses TFDS's default folder (and is what tests use inside
``tfds.testing.mock_data``).

Cars-196: TFDS's download URLs (ai.stanford.edu/~jkrause/car196/) are dead upstream, so ``tfds build cars196`` fails.
Either place a prepared copy at ``<data_dir>/cars196/<version>/`` (built elsewhere), or pass ``manual_dir`` = a folder
with the original Stanford Cars files extracted (``cars_train/``, ``cars_test/``, ``devkit/cars_train_annos.mat``,
``devkit/cars_meta.mat``, ``cars_test_annos_withlabels.mat``, i.e. what the TFDS builder would have downloaded); they
are then read directly, without TFDS.

Host-side preprocessing (the reference's CPU ``BASE_TRANSFORM``, LORM_SPEC §10.4): every image is converted to RGB and
resized on the host with PIL to ``image_size`` x ``image_size`` (``uint8``):

* all datasets but Cars: ``Resize((S, S), bicubic)`` (aspect ratio not kept), PIL's bicubic as torchvision uses it;
* Cars-196: ``Resize(S)`` (shorter side to S, torchvision's default bilinear) then ``CenterCrop(S)``, as the reference's
  deeplake pre-processing.

``image_size=0`` keeps the stored size (only when all images share one size, e.g. CIFAR 32, EuroSAT 64); the on-device
augmentation then does all resampling (less host/device memory, differs from the reference's pipeline).

Canonical order and our splits: within each TFDS split, records are sorted by their file name / id (field
``_SPECS[name].key``), so nothing depends on TFDS's shard order. Where TFDS has no test split, the split is
:func:`lorm_jax.data.datasets.stratified_split` of the canonical order with ``test_fraction`` (0.2) and ``split_seed``:
per class (ascending), a permutation from ``np.random.default_rng(split_seed)`` sends
``clip(round(0.2 n_c), 1, n_c - 1)`` images to test. :func:`split_info` returns the seed, the sizes and SHA-256
checksums of the train/test index lists (positions in the canonical order) and of the file names; the engine writes it
to the results. ImageNet-R/A labels are ImageNet-1k ids in TFDS; they are mapped to ``0..199`` in ascending id order,
which is ascending WordNet-id order, i.e. the class order of the reference's ``ImageFolder``.

Options of every loader: ``data_dir``, ``image_size`` (224), ``split_seed`` (0), ``test_fraction`` (0.2),
``max_examples`` (0 = all; else the first ``max_examples`` records of each TFDS split, for debugging: fewer classes may
then be present), ``num_threads`` (0 = up to 16 reader threads), ``manual_dir`` (Cars only).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Callable

import numpy as np
from etils import epath

from lorm_jax.data import datasets as _datasets
from lorm_jax.data.datasets import ArrayDataset, DatasetFormatError, DatasetNotFoundError

log = logging.getLogger(__name__)

__all__ = ["NAMES", "load_tfds", "split_info", "split_checksums", "canonical_split", "prepared_dir",
           "read_cars_manual"]

PREFIX = "tfds/"


@dataclasses.dataclass(frozen=True)
class _Spec:
    splits: tuple[str, ...]      # TFDS splits read: ("train", "test") official, or one split we divide 80/20
    key: str                     # per-record file name / id feature: the canonical sort key
    num_classes: int             # classes of the benchmark (after mapping sparse ImageNet-1k ids)
    sparse_labels: bool = False  # labels are a subset of a larger label space (ImageNet-R/A): map to 0..C-1
    host_resize: str = "squash"  # squash: Resize((S, S), bicubic) | short_side_crop: Resize(S) + CenterCrop(S)
                                 # | none: the stored array as is (image_size must be 0)
    examples: tuple[int, ...] = ()  # examples in each of ``splits`` (TFDS's published split sizes)
    source: str = ""             # the TFDS dataset's name where it is not the key (our own builders)
    stored_shape: tuple[int, ...] = ()  # with host_resize "none": the images' shape


_SPECS = {
    "cifar100": _Spec(("train", "test"), "id", 100, examples=(50_000, 10_000)),
    "imagenet_r": _Spec(("test",), "file_name", 200, sparse_labels=True, examples=(30_000,)),
    "imagenet_a": _Spec(("test",), "file_name", 200, sparse_labels=True, examples=(7_500,)),
    "caltech_birds2011": _Spec(("train", "test"), "image/filename", 200, examples=(5_994, 5_794)),
    "cars196": _Spec(("train", "test"), "id", 196, host_resize="short_side_crop", examples=(8_144, 8_041)),
    "eurosat/rgb": _Spec(("train",), "filename", 10, examples=(27_000,)),
    "fashion_mnist": _Spec(("train", "test"), "id", 10, host_resize="none", examples=(60_000, 10_000),
                           source="lorm_fashion_mnist", stored_shape=(28, 28, 1)),
}
NAMES = tuple(PREFIX + n for n in _SPECS)

_BUILD_HINT = {
    "cifar100": "tfds build cifar100 --file_format=array_record --data_dir={data_dir}",
    "imagenet_r": "tfds build imagenet_r --file_format=array_record --data_dir={data_dir}",
    "imagenet_a": "tfds build imagenet_a --file_format=array_record --data_dir={data_dir}",
    "caltech_birds2011": "tfds build caltech_birds2011 --file_format=array_record --data_dir={data_dir}",
    "eurosat/rgb": "tfds build eurosat/rgb --file_format=array_record --data_dir={data_dir}",
    "lorm_fashion_mnist": "python -m lorm_jax.data.fashion_mnist_tfds --data_dir={data_dir} (from the IDX files of "
                          "dataset-fashion-mnist; no TensorFlow needed)",
}
_CARS_HINT = (
    "Cars-196 cannot be built by TFDS: its download URLs (ai.stanford.edu/~jkrause/car196/) are dead upstream. "
    "Either (a) place a copy prepared elsewhere in the ArrayRecord format at {data_dir}/cars196/<version>/ "
    "(dataset_info.json, features.json, cars196-{{train,test}}.array_record-*), or (b) pass "
    "manual_dir=<folder> (--config.data.options.manual_dir=...) holding the original Stanford Cars files extracted: "
    "cars_train/*.jpg, cars_test/*.jpg, devkit/cars_train_annos.mat, devkit/cars_meta.mat and "
    "cars_test_annos_withlabels.mat")

# split records of the datasets loaded in this process, by registry name (see split_info)
_SPLIT_INFO: dict[str, dict] = {}


# ----------------------------------------------------------------------------------------------------------------------
# Lazy third-party imports (the package works without tensorflow-datasets / grain; only these loaders need them)

def _import(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the TFDS paper datasets need {module!r}: pip install 'lorm_jax[tfds]' "
                          f"(tensorflow-datasets, grain, pillow; TensorFlow is NOT needed) ({e})") from e


# ----------------------------------------------------------------------------------------------------------------------
# Finding a prepared copy

def _version_key(v: str):
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (-1,)


def prepared_dir(data_dir: str, tfds_name: str, splits: tuple[str, ...]) -> tuple[str, str]:
    """``(folder, version)`` of the newest ArrayRecord copy of ``tfds_name`` under ``data_dir`` holding ``splits``.

    Raises DatasetNotFoundError (never downloads) when there is none, saying what to run; a copy prepared in the
    TFRecord format is named as such (grain's random access needs ArrayRecord).
    """
    base = epath.Path(os.fspath(data_dir)).joinpath(*tfds_name.split("/"))  # local or gs://
    hint = (_CARS_HINT if tfds_name == "cars196" else
            "Prepare it (`tfds build` needs TensorFlow: run it anywhere, then copy the folder): "
            + _BUILD_HINT[tfds_name])
    hint = hint.format(data_dir=data_dir)
    if not epath.Path(os.fspath(data_dir)).is_dir():
        raise DatasetNotFoundError(f"TFDS data_dir {data_dir!r} does not exist (dataset {tfds_name}). {hint}")
    versions = sorted((v.name for v in (base.iterdir() if base.is_dir() else [])
                       if (v / "dataset_info.json").exists()), key=_version_key)
    if not versions:
        raise DatasetNotFoundError(f"no prepared TFDS copy of {tfds_name!r} in {str(base)!r} (expected "
                                   f"{base}/<version>/dataset_info.json). {hint}")
    version = versions[-1]
    folder = base / version
    info = json.loads((folder / "dataset_info.json").read_text())
    fmt = info.get("fileFormat", "tfrecord")
    if fmt != "array_record":
        raise DatasetNotFoundError(
            f"{folder} was prepared in the {fmt!r} format, but grain needs random access (ArrayRecord). Rebuild it "
            f"with --file_format=array_record: " + (_BUILD_HINT.get(tfds_name, "").format(data_dir=data_dir) or hint))
    have = {s.get("name") for s in info.get("splits", [])}
    for split in splits:
        if split not in have:
            raise DatasetFormatError(f"{folder}: the prepared copy has splits {sorted(have)}, not {split!r}. {hint}")
        shards = list(folder.glob(f"*-{split}.array_record-*"))
        if not shards:
            raise DatasetNotFoundError(f"{folder}: dataset_info.json lists split {split!r} but its "
                                       f"*-{split}.array_record-* files are missing (incomplete copy?). {hint}")
    return os.fspath(folder), version


# ----------------------------------------------------------------------------------------------------------------------
# Host-side image preprocessing

def _to_rgb_pil(image):
    PIL_Image = _import("PIL.Image")
    if isinstance(image, PIL_Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        raise DatasetFormatError(f"expected uint8 images, got {a.dtype} {a.shape}")
    return PIL_Image.fromarray(a).convert("RGB")


def host_resize(image, size: int, mode: str = "squash") -> np.ndarray:
    """One image (``uint8 [H, W]``, ``[H, W, 1|3|4]`` or a PIL image) -> ``uint8 [size, size, 3]`` (``size=0``: as is).

    ``squash``: ``Resize((size, size))`` with PIL bicubic (torchvision on PIL images calls exactly this).
    ``short_side_crop``: torchvision ``Resize(size)`` (shorter side to ``size``, longer side ``int(size * long /
    short)``, bilinear) then ``CenterCrop(size)`` (offsets ``round((H - size) / 2)``).
    """
    PIL_Image = _import("PIL.Image")
    im = _to_rgb_pil(image)
    if size:
        if mode == "squash":
            im = im.resize((size, size), PIL_Image.BICUBIC)
        elif mode == "short_side_crop":
            w, h = im.size
            if w <= h:
                nw, nh = size, int(size * h / w)
            else:
                nw, nh = int(size * w / h), size
            im = im.resize((nw, nh), PIL_Image.BILINEAR)
            top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
        else:
            raise ValueError(f"host resize mode must be squash or short_side_crop, got {mode!r}")
    return np.asarray(im, dtype=np.uint8)


def _text(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray):
        return _text(v.item())
    return str(v)


def _read_all(source, decode: Callable, size: int, num_threads: int, max_examples: int, what: str):
    """Decode every record of a random-access ``source`` with grain: ``(uint8 [N, S, S, 3], int64 [N], keys [N])``."""
    grain = _import("grain")
    ds = grain.MapDataset.source(source)
    if max_examples:
        ds = ds[:max_examples]
    n = len(ds)
    if n == 0:
        raise DatasetFormatError(f"{what}: no records")
    threads = num_threads or min(16, os.cpu_count() or 1)
    batch = 64
    it = ds.map(decode).batch(batch).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * threads, 4)))
    images = labels = None
    keys = np.empty(n, dtype=object)
    pos = 0
    for x, y, k in _checked(it, what):
        if images is None:
            images = np.empty((n,) + x.shape[1:], np.uint8)  # filled in place: no list of arrays
            labels = np.empty(n, np.int64)
        if x.shape[1:] != images.shape[1:]:
            raise DatasetFormatError(f"{what}: images of different sizes {images.shape[1:]} and {x.shape[1:]}; "
                                     f"use image_size > 0 to resize them on the host")
        images[pos:pos + len(x)] = x
        labels[pos:pos + len(x)] = y
        keys[pos:pos + len(x)] = [str(s) for s in k]
        pos += len(x)
    assert pos == n, (pos, n)
    return images, labels, keys


def _checked(iterator, what: str):
    """Iterate, turning grain's failure to stack images of different sizes into an error that says what to do."""
    try:
        yield from iterator
    except ValueError as e:
        if "shape" in str(e):
            raise DatasetFormatError(f"{what}: cannot batch images of different sizes ({e}); use image_size > 0 to "
                                     f"resize them on the host") from e
        raise


def _decode_record(example: dict, *, key: str, size: int, mode: str):
    image = np.asarray(example["image"], np.uint8) if mode == "none" else host_resize(example["image"], size, mode)
    return image, np.int64(example["label"]), _text(example.get(key, ""))


# ----------------------------------------------------------------------------------------------------------------------
# Splits and their checksums

def canonical_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Our stratified train/test split of one canonically ordered split (see the module docstring)."""
    return _datasets.stratified_split(np.asarray(labels), test_fraction, seed)


def split_checksums(train_idx: np.ndarray, test_idx: np.ndarray, train_keys=(), test_keys=()) -> dict:
    """SHA-256 of the index lists (``int64`` little-endian, ``b"train:" + train + b"|test:" + test``) and of the file
    names / ids (``"\\n"``-joined, train then ``"\\n--\\n"`` then test)."""
    h = hashlib.sha256()
    h.update(b"train:" + np.asarray(train_idx, "<i8").tobytes() + b"|test:" + np.asarray(test_idx, "<i8").tobytes())
    k = hashlib.sha256(("\n".join(map(str, train_keys)) + "\n--\n" + "\n".join(map(str, test_keys))).encode())
    return {"index_sha256": h.hexdigest(), "keys_sha256": k.hexdigest()}


def split_info(name: str) -> dict:
    """The split record of the last load of ``name`` (``"tfds/imagenet_r"`` or ``"imagenet_r"``) in this process:
    ``{dataset, source, tfds_version, split, split_seed, test_fraction, n_train, n_test, index_sha256, keys_sha256,
    max_examples, image_size}``. JSON-serialisable; the engine writes it to ``results.json``."""
    full = name if name.startswith(PREFIX) else PREFIX + name
    if full not in _SPLIT_INFO:
        raise KeyError(f"no split record for {name!r}: load it first (loaded so far: {sorted(_SPLIT_INFO)})")
    return dict(_SPLIT_INFO[full])


# ----------------------------------------------------------------------------------------------------------------------
# TFDS reading

def _data_source(tfds_name: str, split: str, data_dir: str | None, version: str | None):
    tfds = _import("tensorflow_datasets")
    spec_name = f"{tfds_name}:{version}" if version else tfds_name
    try:
        return tfds.data_source(spec_name, split=split, data_dir=data_dir, download=False, try_gcs=False)
    except Exception as e:  # TFDS raises assorted types here (NotImplementedError for "not prepared", …)
        if data_dir is None:
            hint = (_CARS_HINT if tfds_name == "cars196" else "Prepare it: " + _BUILD_HINT[tfds_name]).format(
                data_dir="<data_dir>")
            raise DatasetNotFoundError(
                f"could not open TFDS {tfds_name!r} split {split!r} from TFDS's default data_dir ({e}). Pass "
                f"data_dir=<folder with prepared copies> (--config.data.options.data_dir=...). {hint}") from e
        raise DatasetFormatError(f"TFDS could not open the prepared copy of {tfds_name!r} split {split!r} in "
                                 f"{data_dir!r}: {type(e).__name__}: {e}") from e


def _label_names(source) -> list[str] | None:
    try:
        feature = source.dataset_info.features["label"]
        return [str(n) for n in feature.names]
    except Exception:  # noqa: BLE001 - names are cosmetic
        return None


def load_tfds(tfds_name: str, *, data_dir: str | None = None, image_size: int = 224, split_seed: int = 0,
              test_fraction: float = 0.2, max_examples: int = 0, num_threads: int = 0,
              manual_dir: str | None = None) -> ArrayDataset:
    """Load one paper dataset (``tfds_name`` a key of ``_SPECS``) as an :class:`ArrayDataset` (module docstring)."""
    if tfds_name not in _SPECS:
        raise ValueError(f"unknown TFDS paper dataset {tfds_name!r}; valid: {', '.join(_SPECS)}")
    spec = _SPECS[tfds_name]
    if image_size < 0 or max_examples < 0:
        raise ValueError(f"{tfds_name}: image_size and max_examples must be >= 0")
    if spec.host_resize == "none" and image_size:
        raise ValueError(f"{tfds_name}: its images are used as stored (as the IDX loader gives them); image_size "
                         f"must be 0, not {image_size}")
    data_dir = os.fspath(data_dir) if data_dir else None
    _import("grain")  # fail early, naming the missing dependency
    if not manual_dir:
        _import("tensorflow_datasets")
    if manual_dir and tfds_name != "cars196":
        raise ValueError(f"manual_dir is only supported for cars196, not {tfds_name!r}")
    name = PREFIX + tfds_name
    if manual_dir:
        parts, class_names, version, source = read_cars_manual(manual_dir, image_size, max_examples, num_threads)
    else:
        version = None
        if data_dir is not None:
            _, version = prepared_dir(data_dir, spec.source or tfds_name, spec.splits)
        parts, class_names = {}, None
        decode = functools.partial(_decode_record, key=spec.key, size=image_size, mode=spec.host_resize)
        for split in spec.splits:
            src = _data_source(spec.source or tfds_name, split, data_dir, version)
            class_names = class_names or _label_names(src)
            try:
                version = version or str(src.dataset_info.version)
            except Exception:  # noqa: BLE001
                pass
            parts[split] = _read_all(src, decode, image_size, num_threads, max_examples, f"{tfds_name}[{split}]")
        source = f"tfds {tfds_name}:{version} ({data_dir or 'default/mock data_dir'})"

    # canonical order: by file name / id within each TFDS split
    for split, (x, y, k) in list(parts.items()):
        order = np.argsort(np.asarray(k, dtype=str), kind="stable")
        parts[split] = (x[order], y[order], k[order])

    if len(spec.splits) == 2:
        (x_tr, y_tr, k_tr), (x_te, y_te, k_te) = parts["train"], parts["test"]
        tr_idx, te_idx = np.arange(len(y_tr)), np.arange(len(y_te))
        split_desc = "official TFDS train/test"
        y_all = np.concatenate([y_tr, y_te])
    else:
        x, y_all, k = parts[spec.splits[0]]
        tr_idx, te_idx = canonical_split(y_all, test_fraction, split_seed)
        x_tr, y_tr, k_tr, x_te, y_te, k_te = x[tr_idx], y_all[tr_idx], k[tr_idx], x[te_idx], y_all[te_idx], k[te_idx]
        split_desc = (f"ours: stratified {1 - test_fraction:g}/{test_fraction:g} of the TFDS "
                      f"{spec.splits[0]!r} split, seed {split_seed}")
        del x

    if spec.sparse_labels:  # ImageNet-1k ids -> 0..C-1 in ascending id (= WordNet id) order
        used = np.unique(y_all)
        if len(used) != spec.num_classes:
            log.warning("%s: %d distinct labels, the benchmark has %d (max_examples=%d)", tfds_name, len(used),
                        spec.num_classes, max_examples)
        y_tr, y_te = np.searchsorted(used, y_tr), np.searchsorted(used, y_te)
        class_names = [class_names[i] if class_names and i < len(class_names) else str(i) for i in used]
    else:
        n = len(class_names) if class_names else spec.num_classes
        if n != spec.num_classes:
            raise DatasetFormatError(f"{tfds_name}: the label feature has {n} classes, expected {spec.num_classes}")
        class_names = class_names or [str(i) for i in range(n)]

    info = {"dataset": name, "source": source, "tfds_version": version, "split": split_desc,
            "split_seed": int(split_seed) if len(spec.splits) == 1 else None,
            "test_fraction": float(test_fraction) if len(spec.splits) == 1 else None,
            "canonical_order": f"sorted by {spec.key!r}", "n_train": int(len(y_tr)), "n_test": int(len(y_te)),
            "max_examples": int(max_examples), "image_size": int(image_size), "host_resize": spec.host_resize,
            **split_checksums(tr_idx, te_idx, k_tr, k_te)}
    _SPLIT_INFO[name] = info
    log.info("%s: %d train / %d test, %d classes; split %s (%s)", name, len(y_tr), len(y_te), len(class_names),
             split_desc, info["index_sha256"][:16])
    return ArrayDataset(name=name, kind="image", x_train=np.ascontiguousarray(x_tr), y_train=y_tr.astype(np.int32),
                        x_test=np.ascontiguousarray(x_te), y_test=y_te.astype(np.int32),
                        class_names=tuple(class_names))


def abstract_tfds(tfds_name: str, *, image_size: int = 224, split_seed: int = 0, test_fraction: float = 0.2,
                  **_) -> ArrayDataset:
    """A paper dataset's shapes without its data (for compiling a run ahead of time, :mod:`lorm_jax.aot`): TFDS's
    split sizes, our train/test split of single-split datasets, and labels spread as evenly over the classes as the
    sizes allow (exact for CIFAR-100; the real class counts of the other datasets are uneven). Images are a zero-stride
    ``uint8 [N, S, S, 3]`` view of one zero: no memory."""
    if tfds_name not in _SPECS:
        raise ValueError(f"unknown TFDS paper dataset {tfds_name!r}; valid: {', '.join(_SPECS)}")
    spec = _SPECS[tfds_name]
    labels = [np.arange(n, dtype=np.int32) % spec.num_classes for n in spec.examples]
    if len(labels) == 2:
        y_tr, y_te = labels
    else:
        tr_idx, te_idx = canonical_split(labels[0], test_fraction, split_seed)
        y_tr, y_te = labels[0][tr_idx], labels[0][te_idx]
    shape = spec.stored_shape or (image_size, image_size, 3)
    images = lambda n: np.broadcast_to(np.zeros((), np.uint8), (n, *shape))
    return ArrayDataset(name=PREFIX + tfds_name, kind="image", x_train=images(len(y_tr)), y_train=np.sort(y_tr),
                        x_test=images(len(y_te)), y_test=np.sort(y_te),
                        class_names=tuple(str(i) for i in range(spec.num_classes)))


# ----------------------------------------------------------------------------------------------------------------------
# Cars-196 from the original Stanford files (TFDS cannot download them)

def _mat_annotations(path: str) -> list[tuple[str, int]]:
    """``[(fname, class_1_based)]`` from a Stanford Cars annotation ``.mat`` (struct array ``annotations``)."""
    sio = _import("scipy.io")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"Cars-196 manual_dir: missing {path}. {_CARS_HINT.format(data_dir='<data_dir>')}")
    try:
        ann = sio.loadmat(path, squeeze_me=True, struct_as_record=False)["annotations"]
    except Exception as e:  # noqa: BLE001
        raise DatasetFormatError(f"{path}: not a Stanford Cars annotation file ({e})") from e
    ann = np.atleast_1d(ann)
    return [(str(a.fname), int(getattr(a, "class"))) for a in ann]


def read_cars_manual(manual_dir: str, image_size: int, max_examples: int = 0, num_threads: int = 0):
    """Cars-196 from the extracted original files in ``manual_dir`` (layout in the module docstring), images decoded
    with PIL and pre-processed as the reference (``Resize(S)`` + ``CenterCrop(S)``). Returns
    ``({"train": (x, y, keys), "test": ...}, class_names, version, source)``; keys are the file stems (= TFDS ids)."""
    sio = _import("scipy.io")
    PIL_Image = _import("PIL.Image")
    manual_dir = os.fspath(manual_dir)
    meta_path = os.path.join(manual_dir, "devkit", "cars_meta.mat")
    if not os.path.isfile(meta_path):
        raise DatasetNotFoundError(f"Cars-196 manual_dir: missing {meta_path}. "
                                   f"{_CARS_HINT.format(data_dir='<data_dir>')}")
    names = [str(n) for n in np.atleast_1d(sio.loadmat(meta_path, squeeze_me=True)["class_names"])]
    files = {"train": (os.path.join(manual_dir, "devkit", "cars_train_annos.mat"), "cars_train"),
             "test": (os.path.join(manual_dir, "cars_test_annos_withlabels.mat"), "cars_test")}
    parts = {}
    for split, (ann_path, folder) in files.items():
        ann = _mat_annotations(ann_path)
        paths = [os.path.join(manual_dir, folder, f) for f, _ in ann]
        labels = [c - 1 for _, c in ann]
        if any(not 0 <= c < len(names) for c in labels):
            raise DatasetFormatError(f"{ann_path}: class ids outside 1..{len(names)}")
        missing = [p for p in paths[:max_examples or None] if not os.path.isfile(p)]
        if missing:
            raise DatasetNotFoundError(f"Cars-196 manual_dir: {len(missing)} image(s) listed in {ann_path} are "
                                       f"missing, e.g. {missing[0]}")

        def decode(i, paths=paths, labels=labels):
            with PIL_Image.open(paths[i]) as im:
                x = host_resize(im, image_size, "short_side_crop")
            return x, np.int64(labels[i]), os.path.splitext(os.path.basename(paths[i]))[0]

        parts[split] = _read_all(list(range(len(paths))), decode, image_size, num_threads, max_examples,
                                 f"cars196 manual {split}")
    return parts, names, "manual", f"Stanford Cars original files in {manual_dir}"


# ----------------------------------------------------------------------------------------------------------------------
# Registration

for _n, _s in _SPECS.items():
    _datasets.register(PREFIX + _n, functools.partial(load_tfds, _n, **({"image_size": 0} if _s.host_resize == "none"
                                                                        else {})), overwrite=True)
del _n, _s
