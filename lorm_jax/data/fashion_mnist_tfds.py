"""Fashion-MNIST as a genuine TFDS dataset, prepared from the local IDX files, for the TFDS + grain path.

    python -m lorm_jax.data.fashion_mnist_tfds [--data_dir DIR] [--idx_dir DIR] [--max_examples N]
    lorm-jax run --config configs/default.py --config.data.name=tfds/fashion_mnist

``--data_dir`` defaults to TFDS's own default (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``), where the run
finds it without a ``data.options.data_dir``.

writes ``<data_dir>/lorm_fashion_mnist/1.0.0/``: ArrayRecord shards of both splits, ``dataset_info.json`` and
``features.json``, by TFDS's own ``GeneratorBasedBuilder`` (its writer, shuffler, split bookkeeping and checksums), so
``tfds.data_source`` and :mod:`lorm_jax.data.tfds_data` read it as any prepared TFDS dataset. Features: ``image``
``uint8 [28, 28, 1]`` (PNG), ``label`` (the 10 class names), ``id`` (``train_00042``: the split and the position in
the IDX file; the records are stored in TFDS's shuffled order and read back sorted by it).

Why a builder of ours: TFDS's ``fashion_mnist`` builder reads the IDX files with TensorFlow and stores no id, so the
IDX order could not be recovered; this one needs no TensorFlow (PIL encodes the PNGs) and keeps the order. The builder
is not registered with TFDS, so ``lorm_fashion_mnist`` is read from its files (``features.json``) alone.
"""
from __future__ import annotations

import argparse
import os

from lorm_jax.data import datasets

NAME, VERSION_STR = "lorm_fashion_mnist", "1.0.0"
_SPLITS = {"train": "train", "test": "t10k"}  # TFDS split -> IDX file prefix


def prepare(data_dir: str | None = None, idx_dir: str = datasets.FASHION_MNIST_DIR, max_examples: int = 0) -> str:
    """Prepare ``lorm_fashion_mnist`` in ``data_dir`` (None: TFDS's default) from the IDX(.gz) files in ``idx_dir``
    (the first ``max_examples`` of each split if > 0, for tests); returns the version folder. An existing copy is
    kept."""
    ds = datasets.load("fashion_mnist", data_dir=idx_dir)
    data_dir = None if data_dir is None else os.fspath(data_dir)
    builder = _builder_class()(data_dir=data_dir, file_format="array_record", dataset=ds, max_examples=max_examples)
    builder.download_and_prepare()
    return os.fspath(builder.data_dir)


def _builder_class():
    import PIL.Image
    import tensorflow_datasets as tfds

    class LormFashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Fashion-MNIST from an :class:`~lorm_jax.data.datasets.ArrayDataset` of the IDX files."""
        name = NAME
        VERSION = tfds.core.Version(VERSION_STR)
        RELEASE_NOTES = {VERSION_STR: "Fashion-MNIST from the IDX files, with each example's IDX position as its id."}

        def __init__(self, *, dataset: datasets.ArrayDataset, max_examples: int = 0, **kwargs):
            self._dataset, self._max = dataset, max_examples or None
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description="Fashion-MNIST (Zalando), 28x28 greyscale, 10 classes, from the IDX files.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(datasets.FASHION_MNIST_CLASSES)),
                    "id": tfds.features.Text()}),
                supervised_keys=("image", "label"), homepage="https://github.com/zalandoresearch/fashion-mnist")

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in _SPLITS}

        def _generate_examples(self, split):
            x, y = ((self._dataset.x_train, self._dataset.y_train) if split == "train" else
                    (self._dataset.x_test, self._dataset.y_test))
            for i in range(len(y[:self._max])):
                key = f"{_SPLITS[split]}_{i:05d}"
                yield key, {"image": PIL.Image.fromarray(x[i, :, :, 0]), "label": int(y[i]), "id": key}

    return LormFashionMnist


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lorm_jax.data.fashion_mnist_tfds", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", help="TFDS data_dir to prepare lorm_fashion_mnist in (default: TFDS's default, "
                   "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--idx_dir", default=datasets.FASHION_MNIST_DIR, help="folder of the IDX(.gz) files")
    p.add_argument("--max_examples", type=int, default=0, help="only the first N of each split (0 = all)")
    args = p.parse_args(argv)
    from lorm_jax.data import fashion_mnist_tfds  # not __main__: the builder's module as dataset_info.json names it
    print(fashion_mnist_tfds.prepare(args.data_dir, args.idx_dir, args.max_examples))


if __name__ == "__main__":
    main()
