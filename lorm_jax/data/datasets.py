"""Host-side datasets for the FCIL experiments (numpy only, no JAX).

Every loader returns an :class:`ArrayDataset` whose arrays live in host memory:

* images: ``x`` is ``uint8 [N, H, W, C]`` with ``C in {1, 3}`` (pixel values 0..255);
* text:   ``x`` is a 1-D ``object`` array of Python ``str`` of length ``N``;
* labels: ``y`` is ``int32 [N]`` with values in ``0 .. num_classes - 1``.

Registry (``load(name, **options)``):

==================== ===== ================================================================================
name                 kind  source
==================== ===== ================================================================================
``fashion_mnist``    image Debian ``dataset-fashion-mnist`` idx(.gz) files, 60k/10k, 28x28x1, 10 classes
``wordnet_nouns``    text  Debian ``wordnet-base`` noun glosses -> 26 noun supersenses (82,115 synsets)
``wordnet_all``      text  noun/verb/adj/adv glosses -> 45 lexicographer files (117,659 synsets)
``digits``           image scikit-learn ``load_digits`` (1,797 8x8 images, 0..16 scaled to 0..255), 10 classes
``synthetic_images`` image class-conditional smooth colour templates + random shift, contrast and noise
``synthetic_text``   text  class keywords mixed with shared filler words
==================== ===== ================================================================================

Deterministic splits: datasets without an official test split (WordNet, digits) are split per class with
:func:`stratified_split`; for class ``c`` with ``n_c`` samples a seeded permutation puts
``n_test_c = clip(round(f * n_c), 1, n_c - 1)`` samples (``0`` when ``n_c < 2``) in the test set.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import struct
import warnings
import zlib
from typing import Callable, Sequence

import numpy as np
from etils import epath

logger = logging.getLogger(__name__)

__all__ = [
    "ArrayDataset",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "load",
    "load_with_fallback",
    "available",
    "register",
    "subsample_per_class",
    "select_classes",
    "stratified_split",
    "read_idx",
    "parse_wordnet_data",
    "read_lexnames",
    "WORDNET_LEXNAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "WORDNET_DIR",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
WORDNET_DIR = "/usr/share/wordnet"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# WordNet 3.0 lexicographer file names, indexed by file number (lexnames(5WN)).
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)


class DatasetNotFoundError(FileNotFoundError):
    """The files of an optional dataset are not installed (the message says how to install them)."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is truncated or corrupt (the message names the file)."""


# ---------------------------------------------------------------------------------------------------------------------
# The container
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A labelled train/test dataset held in host memory.

    Attributes:
      name: registry name (plus suffixes added by helpers, e.g. ``"digits[sub]"``).
      kind: ``"image"`` or ``"text"``.
      x_train, x_test: images ``uint8 [N, H, W, C]`` or text ``object [N]`` of ``str``.
      y_train, y_test: ``int32 [N]`` labels in ``0 .. num_classes - 1``.
      class_names: ``num_classes`` names; ``class_names[c]`` names label ``c``.
    """

    name: str
    kind: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        if self.kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {self.kind!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(f"{self.name}: len(x_{split})={len(x)} != len(y_{split})={len(y)}")
            if y.ndim != 1:
                raise ValueError(f"{self.name}: y_{split} must be 1-D, got shape {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise ValueError(f"{self.name}: y_{split} has labels outside 0..{len(self.class_names) - 1}")
            if self.kind == "image" and (x.ndim != 4 or x.dtype != np.uint8):
                raise ValueError(f"{self.name}: image x_{split} must be uint8 [N,H,W,C], got {x.dtype} {x.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """``(H, W, C)`` for image datasets, ``None`` for text."""
        return tuple(self.x_train.shape[1:]) if self.kind == "image" else None

    def counts(self, split: str = "train") -> np.ndarray:
        """``int64 [num_classes]`` number of samples per class in ``split`` (``"train"`` or ``"test"``)."""
        y = self.y_train if split == "train" else self.y_test
        return np.bincount(y, minlength=self.num_classes)

    def __repr__(self) -> str:  # the default repr would print whole arrays
        shape = self.image_shape if self.kind == "image" else "str"
        return (f"ArrayDataset(name={self.name!r}, kind={self.kind!r}, train={len(self.y_train)}, "
                f"test={len(self.y_test)}, num_classes={self.num_classes}, x={shape})")


# ---------------------------------------------------------------------------------------------------------------------
# Generic helpers
# ---------------------------------------------------------------------------------------------------------------------
def _per_class_take(y: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions keeping at most ``n`` random samples of every class (all when ``n`` is None)."""
    if n is None:
        return np.arange(len(y))
    if n < 0:
        raise ValueError(f"samples per class must be >= 0 or None, got {n}")
    keep = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        if len(pos) > n:
            pos = pos[rng.permutation(len(pos))[:n]]
        keep.append(pos)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def subsample_per_class(ds: ArrayDataset, n_train: int | None, n_test: int | None, seed: int) -> ArrayDataset:
    """Keep at most ``n_train`` (resp. ``n_test``) samples per class, chosen by a seeded permutation.

    Classes with fewer samples are kept whole, so balance is preserved up to the class sizes. The original
    sample order is kept (selected positions are sorted). Train and test use independent child seeds, so changing
    ``n_test`` never changes the train selection. ``None`` keeps the whole split.
    """
    rng_tr, rng_te = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    i_tr = _per_class_take(ds.y_train, n_train, rng_tr)
    i_te = _per_class_take(ds.y_test, n_test, rng_te)
    return dataclasses.replace(ds, x_train=ds.x_train[i_tr], y_train=ds.y_train[i_tr],
                               x_test=ds.x_test[i_te], y_test=ds.y_test[i_te])


def select_classes(ds: ArrayDataset, classes: Sequence[int]) -> ArrayDataset:
    """Keep only ``classes`` (original ids) and relabel them ``0 .. len(classes) - 1`` in the given order.

    Example: drop WordNet noun supersenses with < 150 synsets before building tasks.
    """
    classes = np.asarray(classes, dtype=np.int64)
    if len(np.unique(classes)) != len(classes) or (len(classes) and
                                                   (classes.min() < 0 or classes.max() >= ds.num_classes)):
        raise ValueError(f"classes must be distinct ids in 0..{ds.num_classes - 1}, got {classes.tolist()}")
    new = np.full(ds.num_classes, -1, np.int64)
    new[classes] = np.arange(len(classes))
    m_tr, m_te = new[ds.y_train] >= 0, new[ds.y_test] >= 0
    return dataclasses.replace(
        ds, x_train=ds.x_train[m_tr], y_train=new[ds.y_train[m_tr]].astype(np.int32),
        x_test=ds.x_test[m_te], y_test=new[ds.y_test[m_te]].astype(np.int32),
        class_names=tuple(ds.class_names[c] for c in classes))


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class train/test split of positions ``0..len(y)-1``.

    For each class ``c`` (ascending), with ``n_c`` samples, a permutation from ``default_rng(seed)`` (one
    generator, classes visited in ascending order) sends ``n_test_c = clip(round(test_fraction * n_c), 1, n_c - 1)``
    samples to the test set (``n_test_c = 0`` if ``n_c < 2``). Returns sorted ``(train_pos, test_pos)``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        pos = pos[rng.permutation(len(pos))]
        n_c = len(pos)
        n_te = 0 if (n_c < 2 or test_fraction == 0.0) else int(min(max(round(test_fraction * n_c), 1), n_c - 1))
        te.append(pos[:n_te])
        tr.append(pos[n_te:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(tr), cat(te)


def _text_array(texts: Sequence[str]) -> np.ndarray:
    arr = np.empty(len(texts), dtype=object)
    arr[:] = list(texts)
    return arr


# ---------------------------------------------------------------------------------------------------------------------
# idx files (Fashion-MNIST)
# ---------------------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (optionally gzip-compressed, detected by the ``.gz`` suffix).

    Format: bytes 0-1 are zero, byte 2 is the dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), byte 3 is ``ndim``; then ``ndim`` big-endian int32 dims; then the payload of
    ``prod(dims)`` big-endian items. Returns a writable native-endian array of shape ``dims``.

    Raises DatasetFormatError (naming the file) for a corrupt gzip stream, a bad header, a truncated payload or
    trailing bytes; FileNotFoundError if the file does not exist.
    """
    try:
        raw = epath.Path(path).read_bytes()  # a local or remote (gs://) file
        if str(path).endswith(".gz"):
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetFormatError(f"idx file {path!r} is truncated or not valid gzip: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"idx file {path!r} has a bad magic number {raw[:4]!r} "
                                 f"(expected 00 00 <dtype code> <ndim>)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DatasetFormatError(f"idx file {path!r} is truncated inside its header ({len(raw)} bytes)")
    dims = struct.unpack(">" + "i" * ndim, raw[4:head])
    if any(d < 0 for d in dims):
        raise DatasetFormatError(f"idx file {path!r} has negative dims {dims}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - head
    if got < expected:
        raise DatasetFormatError(f"idx file {path!r} is truncated: dims {dims} need {expected} payload bytes, "
                                 f"found {got}")
    if got > expected:
        raise DatasetFormatError(f"idx file {path!r} is corrupt: {got - expected} trailing bytes after dims {dims}")
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=head).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(data_dir: str, stem: str) -> str | None:
    for cand in (stem + ".gz", stem):
        p = epath.Path(data_dir) / cand
        if p.exists():
            return os.fspath(p)
    return None


def _load_fashion_mnist(data_dir: str = FASHION_MNIST_DIR) -> ArrayDataset:
    """Fashion-MNIST from idx(.gz) files: train 60000 / test 10000 of uint8 [28, 28, 1], 10 classes."""
    stems = {k: f"{p}-{w}-idx{d}-ubyte" for k, (p, w, d) in {
        "xtr": ("train", "images", 3), "ytr": ("train", "labels", 1),
        "xte": ("t10k", "images", 3), "yte": ("t10k", "labels", 1)}.items()}
    paths = {k: _find_idx(data_dir, s) for k, s in stems.items()}
    missing = [stems[k] + "[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files not found in {data_dir!r} (missing: {', '.join(missing)}). Install them with "
            f"`sudo apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}), pass data_dir=..., "
            f"or use the pip-only fallback dataset 'digits' (load_with_fallback('fashion_mnist') does this).")
    fix = (f"Fix: reinstall the files (`sudo apt-get install --reinstall dataset-fashion-mnist`, into "
           f"{FASHION_MNIST_DIR}) or point data_dir (config.data.options.data_dir) at an intact copy")
    arrs = {}
    for k, p in paths.items():
        try:
            arrs[k] = read_idx(p)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{e}. {fix}") from e
        # magic 0x00000803 (uint8, 3 dims [N, 28, 28]) for images, 0x00000801 (uint8, 1 dim [N]) for labels
        want = (3, (28, 28)) if k.startswith("x") else (1, ())
        if arrs[k].dtype != np.uint8 or arrs[k].ndim != want[0] or arrs[k].shape[1:] != want[1]:
            raise DatasetFormatError(
                f"{p!r} is not a Fashion-MNIST {'image' if k.startswith('x') else 'label'} file: expected uint8 "
                f"[N{''.join(f', {d}' for d in want[1])}] (idx magic 0x0000080{want[0]}), found {arrs[k].dtype} "
                f"{list(arrs[k].shape)}. {fix}")
    for split in ("tr", "te"):
        x, y = arrs["x" + split], arrs["y" + split]
        if len(x) != len(y):
            raise DatasetFormatError(f"Fashion-MNIST files {paths['x' + split]!r} / {paths['y' + split]!r} are "
                                     f"inconsistent: {len(x)} images but {len(y)} labels. {fix}")
        if len(y) and y.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetFormatError(f"{paths['y' + split]!r} has labels >= 10. {fix}")
    return ArrayDataset(
        name="fashion_mnist", kind="image",
        x_train=arrs["xtr"][..., None], y_train=arrs["ytr"].astype(np.int32),
        x_test=arrs["xte"][..., None], y_test=arrs["yte"].astype(np.int32),
        class_names=FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# WordNet supersenses
# ---------------------------------------------------------------------------------------------------------------------
def read_lexnames(data_dir: str = WORDNET_DIR) -> tuple[str, ...]:
    """Lexicographer file names indexed by number: from ``<data_dir>/lexnames`` if present (lines
    ``NN name category``), else the embedded WordNet 3.0 list :data:`WORDNET_LEXNAMES`."""
    path = epath.Path(data_dir) / "lexnames"
    if not path.exists():
        return WORDNET_LEXNAMES
    names: dict[int, str] = {}
    with path.open("r", encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                names[int(parts[0])] = parts[1]
            except (ValueError, IndexError) as e:
                raise DatasetFormatError(f"{path!r} line {ln}: expected 'NN name category', got {line!r}") from e
    n = max(max(names) + 1 if names else 0, len(WORDNET_LEXNAMES))  # numbers missing from the file: embedded
    return tuple(names.get(i, WORDNET_LEXNAMES[i] if i < len(WORDNET_LEXNAMES) else f"lex{i:02d}")
                 for i in range(n))


def parse_wordnet_data(path: str, first_clause: bool = True) -> tuple[list[str], np.ndarray]:
    """Parse one WordNet ``data.<pos>`` file into ``(glosses, lexfile_numbers)``.

    Each synset line is ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [ptrs] [frames] | gloss``.
    The text is the gloss after the first ``" | "``; with ``first_clause`` it is cut at the first ``";"`` (this drops
    the quoted usage examples), then stripped. The label is ``int(field 2)`` (the lexicographer file number).
    License header lines (starting with two spaces) and blank lines are skipped.
    Returns a list of ``str`` and an ``int32 [N]`` array.
    """
    texts: list[str] = []
    lex: list[int] = []
    raw = io.BytesIO(epath.Path(path).read_bytes())  # a local or remote (gs://) file, decoded as open() would
    with io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        for ln, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 4:
                raise DatasetFormatError(f"WordNet file {path!r} line {ln} is not a synset line: {line[:80]!r}")
            try:
                lexnum = int(fields[1])
            except ValueError as e:
                raise DatasetFormatError(f"WordNet file {path!r} line {ln}: bad lex_filenum {fields[1]!r}") from e
            if first_clause:
                gloss = gloss.split(";", 1)[0]
            texts.append(gloss.strip())
            lex.append(lexnum)
    return texts, np.asarray(lex, dtype=np.int32)


def _load_wordnet(pos: Sequence[str], name: str, data_dir: str = WORDNET_DIR, test_fraction: float = 0.2,
                  seed: int = 0, first_clause: bool = True) -> ArrayDataset:
    files = [os.fspath(epath.Path(data_dir) / f"data.{p}") for p in pos]
    missing = [p for p in files if not epath.Path(p).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"WordNet data files not found: {', '.join(missing)}. Install them with "
            f"`sudo apt-get install wordnet-base` (files go to {WORDNET_DIR}) or pass data_dir=...")
    texts: list[str] = []
    lex_parts = []
    for p in files:
        try:
            t, labels = parse_wordnet_data(p, first_clause=first_clause)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{e}. Fix: reinstall the files (`sudo apt-get install --reinstall wordnet-base`, "
                                     f"into {WORDNET_DIR}) or point data_dir at an intact copy") from e
        texts.extend(t)
        lex_parts.append(labels)
    lex = np.concatenate(lex_parts) if lex_parts else np.zeros(0, np.int32)
    lexnames = read_lexnames(data_dir)
    used = np.unique(lex)  # sorted lexicographer file numbers -> labels 0..C-1
    if len(used) and used.max() >= len(lexnames):
        raise DatasetFormatError(f"lex_filenum {used.max()} has no name (lexnames has {len(lexnames)} entries)")
    y = np.searchsorted(used, lex).astype(np.int32)
    x = _text_array(texts)
    tr, te = stratified_split(y, test_fraction, seed)
    return ArrayDataset(name=name, kind="text", x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
                        class_names=tuple(lexnames[i] for i in used))


def _load_wordnet_nouns(**kw) -> ArrayDataset:
    """26 noun supersenses (noun.Tops .. noun.time), 82,115 synsets (WordNet 3.0)."""
    return _load_wordnet(("noun",), "wordnet_nouns", **kw)


def _load_wordnet_all(**kw) -> ArrayDataset:
    """All 45 lexicographer files over noun/verb/adj/adv, 117,659 synsets (WordNet 3.0)."""
    return _load_wordnet(("noun", "verb", "adj", "adv"), "wordnet_all", **kw)


# ---------------------------------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------------------------------
def _load_digits(test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """sklearn ``load_digits``: 1,797 images [8, 8, 1]; pixel ``v in 0..16`` -> ``uint8(round(v * 255 / 16))``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int32)
    tr, te = stratified_split(y, test_fraction, seed)
    return ArrayDataset(name="digits", kind="image", x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
                        class_names=tuple(str(i) for i in range(10)))


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------------------------------
def _smooth_template(rng: np.random.Generator, size: int, n_blobs: int, contrast: float,
                     margin: int = 0) -> np.ndarray:
    """One class template, float [size, size, 3] in [0, 1].

    ``T(u) = 0.5 + contrast * z(u)``, where for each channel ``z`` is a sum of ``n_blobs`` isotropic Gaussian
    bumps ``a_b exp(-|u - m_b|^2 / (2 s_b^2))`` (random centre ``m_b``, width ``s_b ~ U(size/8, size/4)``, signed
    amplitude ``a_b ~ N(0, 1)`` per channel), standardised to zero mean and unit std over the central
    ``(size - 2 margin)^2`` window. Hence every class has the same mean colour (0.5 per channel) in its unshifted
    view: classes differ mainly by their spatial colour layout (shifted views move the mean a little).
    """
    g = np.arange(size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(g, g, indexing="ij")
    z = np.zeros((size, size, 3))
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, size, 2)
        s = rng.uniform(size / 8, size / 4)
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        z += bump[..., None] * rng.normal(size=3)
    c = z[margin:size - margin, margin:size - margin]  # statistics of the centred (unshifted) view
    z = (z - c.mean(axis=(0, 1))) / (c.std(axis=(0, 1)) + 1e-8)
    return np.clip(0.5 + contrast * z, 0.0, 1.0)


def _synth_samples(rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray, size: int,
                   max_shift: int, noise: float) -> np.ndarray:
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        dy, dx = rng.integers(0, 2 * max_shift + 1, 2)
        crop = templates[c, dy:dy + size, dx:dx + size]
        gain = rng.uniform(0.8, 1.2)
        img = 0.5 + gain * (crop - 0.5) + noise * rng.normal(size=crop.shape)
        out[i] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return out


def _load_synthetic_images(num_classes: int = 6, n_train: int = 60, n_test: int = 20, image_size: int = 16,
                           seed: int = 0, noise: float = 0.1, max_shift: int = 2, n_blobs: int = 4,
                           contrast: float = 0.2) -> ArrayDataset:
    """Learnable class-conditional images, uint8 [N, S, S, 3] with S = ``image_size``.

    Class ``c`` has a smooth template ``T_c`` of size ``(S + 2 m)^2`` (see :func:`_smooth_template`,
    ``m = max_shift``). A sample is ``x = clip(0.5 + g (T_c[dy:dy+S, dx:dx+S] - 0.5) + noise * eps)`` with
    random shift ``dy, dx ~ U{0..2m}``, contrast gain ``g ~ U(0.8, 1.2)`` and ``eps ~ N(0, I)``, quantised to uint8.
    ``n_train``/``n_test`` samples per class, labels in blocks (class 0 first). Templates, train and test use
    independent child seeds of ``seed``, so ``n_train`` does not change the test set.
    """
    if num_classes < 1 or n_train < 0 or n_test < 0 or image_size < 1 or max_shift < 0:
        raise ValueError("synthetic_images: need num_classes >= 1, n_train/n_test >= 0, image_size >= 1, "
                         "max_shift >= 0")
    s_tpl, s_tr, s_te = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    big = image_size + 2 * max_shift
    templates = np.stack([_smooth_template(s_tpl, big, n_blobs, contrast, max_shift) for _ in range(num_classes)])
    y_tr = np.repeat(np.arange(num_classes, dtype=np.int32), n_train)
    y_te = np.repeat(np.arange(num_classes, dtype=np.int32), n_test)
    return ArrayDataset(
        name="synthetic_images", kind="image",
        x_train=_synth_samples(s_tr, templates, y_tr, image_size, max_shift, noise), y_train=y_tr,
        x_test=_synth_samples(s_te, templates, y_te, image_size, max_shift, noise), y_test=y_te,
        class_names=tuple(f"class_{c}" for c in range(num_classes)))


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic text
# ---------------------------------------------------------------------------------------------------------------------
_FILLER = ("the", "a", "of", "and", "with", "is", "was", "on", "to", "it", "this", "that", "very", "some", "in",
           "for", "near", "we", "they", "saw", "had", "there", "then", "after", "before", "one", "more", "just")
_KEYWORDS = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon",
    "dog", "cat", "horse", "rabbit", "tiger", "lion", "wolf", "bear", "fox", "deer",
    "car", "truck", "train", "plane", "boat", "bicycle", "bus", "rocket", "tractor", "scooter",
    "piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "banjo", "organ",
    "river", "mountain", "forest", "desert", "ocean", "valley", "island", "canyon", "glacier", "meadow",
    "hammer", "wrench", "saw", "drill", "chisel", "shovel", "rake", "ladder", "needle", "scissors",
    "doctor", "teacher", "farmer", "pilot", "lawyer", "chef", "nurse", "sailor", "painter", "baker",
    "red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white",
    "soccer", "tennis", "chess", "hockey", "golf", "boxing", "rugby", "cricket", "skiing", "rowing",
    "rain", "snow", "storm", "thunder", "fog", "wind", "hail", "frost", "sunshine", "drizzle",
    "castle", "church", "bridge", "tower", "temple", "palace", "barn", "cottage", "factory", "museum",
    "copper", "iron", "marble", "granite", "cotton", "silk", "wool", "leather", "glass", "paper",
)


def _load_synthetic_text(num_classes: int = 6, n_train: int = 60, n_test: int = 20, seed: int = 0,
                         keywords_per_class: int = 5, min_len: int = 6, max_len: int = 12,
                         keywords_per_sentence: tuple[int, int] = (1, 3)) -> ArrayDataset:
    """Keyword sentences: class ``c`` owns ``keywords_per_class`` words (disjoint across classes; a seeded
    shuffle of an embedded list of English nouns/adjectives, then ``wordNNN`` tokens if more are needed). A
    sentence has length ``L ~ U{min_len..max_len}``, holds ``k ~ U{k_lo..k_hi}`` keywords of its class (with
    replacement) and ``L - k`` shared filler words, in random order, joined by spaces. Labels in blocks.
    """
    if num_classes < 1 or keywords_per_class < 1 or not 1 <= keywords_per_sentence[0] <= keywords_per_sentence[1]:
        raise ValueError("synthetic_text: bad num_classes/keywords_per_class/keywords_per_sentence")
    if min_len < keywords_per_sentence[1] or max_len < min_len:
        raise ValueError("synthetic_text: need keywords_per_sentence[1] <= min_len <= max_len")
    s_kw, s_tr, s_te = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    need = num_classes * keywords_per_class
    pool = [w for w in _KEYWORDS if w not in _FILLER]
    pool = [pool[i] for i in s_kw.permutation(len(pool))]
    pool += [f"word{i:03d}" for i in range(max(0, need - len(pool)))]
    kw = [pool[c * keywords_per_class:(c + 1) * keywords_per_class] for c in range(num_classes)]

    def make(rng, labels):
        out = []
        for c in labels:
            n = int(rng.integers(min_len, max_len + 1))
            k = int(rng.integers(keywords_per_sentence[0], keywords_per_sentence[1] + 1))
            words = [kw[c][i] for i in rng.integers(0, keywords_per_class, k)]
            words += [_FILLER[i] for i in rng.integers(0, len(_FILLER), n - k)]
            out.append(" ".join(words[i] for i in rng.permutation(n)))
        return _text_array(out)

    y_tr = np.repeat(np.arange(num_classes, dtype=np.int32), n_train)
    y_te = np.repeat(np.arange(num_classes, dtype=np.int32), n_test)
    return ArrayDataset(name="synthetic_text", kind="text", x_train=make(s_tr, y_tr), y_train=y_tr,
                        x_test=make(s_te, y_te), y_test=y_te,
                        class_names=tuple("/".join(k[:2]) for k in kw))


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., ArrayDataset]] = {
    "fashion_mnist": _load_fashion_mnist,
    "wordnet_nouns": _load_wordnet_nouns,
    "wordnet_all": _load_wordnet_all,
    "digits": _load_digits,
    "synthetic_images": _load_synthetic_images,
    "synthetic_text": _load_synthetic_text,
}


def available() -> list[str]:
    """Sorted registry names."""
    return sorted(_REGISTRY)


_BUILT_IN = frozenset(_REGISTRY)


def register(name: str, loader: Callable[..., ArrayDataset], overwrite: bool = False) -> None:
    """Add a dataset: ``loader(**options) -> ArrayDataset`` (``config.data.options`` are its keyword options) under
    ``name``, so that ``config.data.name = name`` loads it (docs/EXTENDING.md). Registering a name again replaces it
    (a config file that registers is loaded more than once); a built-in name only with ``overwrite``."""
    if name in _BUILT_IN and not overwrite:
        raise ValueError(f"dataset {name!r} is built in; register yours under another name")
    _REGISTRY[name] = loader


def load(name: str, **options) -> ArrayDataset:
    """Load registry dataset ``name`` with loader-specific keyword ``options`` (see the module docstring).

    Raises ValueError for an unknown name (listing the valid ones) or an unknown option, DatasetNotFoundError if
    the files of an optional dataset are missing, DatasetFormatError if they are corrupt.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(available())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"dataset {name!r}: {e}") from e
        raise


def load_with_fallback(name: str, **options) -> ArrayDataset:
    """Like :func:`load`, but if ``name == "fashion_mnist"`` and its files are missing, warn (logging +
    ``warnings.warn``) and return ``load("digits")`` instead (``test_fraction``/``seed`` options are forwarded)."""
    try:
        return load(name, **options)
    except DatasetNotFoundError as e:
        if name != "fashion_mnist":
            raise
        msg = (f"Fashion-MNIST is not available ({e}). FALLING BACK to the scikit-learn 'digits' dataset "
               f"(8x8 grey, 1,797 images, 10 classes); results are NOT Fashion-MNIST results.")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return load("digits", **{k: v for k, v in options.items() if k in ("test_fraction", "seed")})
