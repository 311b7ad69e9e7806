"""The paper setup: configs/paper/* against LORM_SPEC §10.5, the TFDS loaders (mocked TFDS, a hand-prepared ArrayRecord
copy, Cars-196 from the original files), our split checksums, and one engine round per dataset on CPU."""
import importlib
import importlib.util
import io
import json
import os
import sys

import chex
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from lorm_jax import config as config_lib  # noqa: E402
from lorm_jax import plan, rounds  # noqa: E402
from lorm_jax.data import datasets as D  # noqa: E402
from lorm_jax.data import tfds_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USE_CODE = tfds.testing.MockPolicy.USE_CODE

# ----------------------------------------------------------------------------------------------------------------------
# Independent transcription of LORM_SPEC §10.5 (fed-mammoth README commands), in the spec's column order:
# dataset, β, lr, lr_B, lr_A, r, rounds/task, α_head, regmean_rounds.  None = "= lr" (the reference's -1).
SPEC_10_5 = [
    ("cifar100", 0.5, 0.003, None, None, 1, 5, 0.5, 1),
    ("cifar100", 0.1, 0.0003, None, None, 16, 5, 0.5, 1),
    ("cifar100", 0.05, 0.0005, None, None, 16, 5, 0.5, 1),
    ("imagenet_r", 0.5, 0.003, None, None, 2, 5, 0.5, 2),
    ("imagenet_r", 0.1, 0.001, None, None, 32, 5, 0.5, 2),
    ("imagenet_r", 0.05, 0.001, None, None, 16, 5, 0.5, 2),
    ("eurosat", 1.0, 0.003, None, None, 1, 5, 0.5, 2),
    ("eurosat", 0.5, 0.001, None, None, 1, 5, 0.5, 2),
    ("eurosat", 0.2, 0.003, None, None, 1, 5, 0.5, 2),
    ("cub200", 1.0, 0.01, None, 0.003, 1, 5, 0.3, 2),
    ("cub200", 0.5, 0.03, None, 0.001, 1, 5, 0.3, 2),
    ("cub200", 0.2, 0.03, None, 0.003, 1, 5, 0.3, 2),
    ("cars196", 1.0, 0.01, 0.001, 0.01, 8, 10, 0.5, 2),
    ("cars196", 0.5, 0.01, 0.001, 0.01, 8, 10, 0.5, 2),
    ("cars196", 0.2, 0.01, 0.001, 0.01, 4, 10, 0.5, 2),
    ("imagenet_a", 1.0, 0.01, 0.001, 0.01, 4, 10, 0.5, 2),
    ("imagenet_a", 0.5, 0.01, 0.001, 0.01, 4, 10, 0.5, 2),
    ("imagenet_a", 0.2, 0.01, 0.001, 0.01, 4, 10, 0.5, 2),
]
# §10.2 tasks, §10.4 transforms: loader, task sizes, augment, crop scale, test resize ratio, mean, std
IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PROTOCOL = {
    "cifar100": ("tfds/cifar100", [10] * 10, "rrc", (0.08, 1.0), 256 / 224, (0.5,) * 3, (0.5,) * 3),
    "imagenet_r": ("tfds/imagenet_r", [20] * 10, "rrc", (0.08, 1.0), 256 / 224, (0.5,) * 3, (0.5,) * 3),
    "imagenet_a": ("tfds/imagenet_a", [20] * 10, "rrc", (0.05, 1.0), 256 / 224, *IMNET),
    "cub200": ("tfds/caltech_birds2011", [20] * 10, "crop", None, 256 / 224, *IMNET),
    "cars196": ("tfds/cars196", [20] * 9 + [16], "flip", None, 0.0, (0.0,) * 3, (1.0,) * 3),
    "eurosat": ("tfds/eurosat/rgb", [2] * 5, "none", None, 0.0, (0.0,) * 3, (1.0,) * 3),
}
TOTAL_CLASSES = {"cifar100": 100, "imagenet_r": 200, "imagenet_a": 200, "cub200": 200, "cars196": 196, "eurosat": 10}


def paper_config(dataset: str, beta):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(f"configs.paper.{dataset}").get_config(None if beta is None else str(beta))


# ----------------------------------------------------------------------------------------------------------------------
# Configs

@pytest.mark.parametrize("row", SPEC_10_5, ids=[f"{r[0]}-{r[1]:g}" for r in SPEC_10_5])
def test_config_matches_spec_table(row):
    dataset, beta, lr, lr_b, lr_a, rank, rounds, alpha_head, passes = row
    c = paper_config(dataset, beta)
    config_lib.validate(c)
    assert c.data.beta == pytest.approx(beta)
    assert c.lr == pytest.approx(lr)
    assert (c.lr_b < 0) if lr_b is None else c.lr_b == pytest.approx(lr_b)
    assert (c.lr_a < 0) if lr_a is None else c.lr_a == pytest.approx(lr_a)
    assert (c.rank, c.rounds, c.gram_passes) == (rank, rounds, passes)
    assert c.alpha_head == pytest.approx(alpha_head)
    # common settings (README): epochs 5, 10 clients, batch 16, wd 0, α_backbone 0, LoRM alt, ViT-B/16 fused qkv
    assert (c.epochs, c.num_clients, c.batch_size, c.seed) == (5, 10, 16, 42)
    assert c.weight_decay == 0.0 and c.alpha_backbone == 0.0 and c.method == "lorm"
    assert c.backbone.name == "vit_b16_augreg_in21k"
    assert c.backbone.options.image_size == 224 and c.backbone.options.qkv == "fused" and c.backbone.options.path
    name, sizes, augment, crop_scale, ratio, mean, std = PROTOCOL[dataset]
    assert c.data.name == name and c.data.name in D.available()
    assert c.data.options.image_size == 224 and c.data.options.data_dir
    per_task = c.data.classes_per_task
    got = [per_task] * (TOTAL_CLASSES[dataset] // per_task) if isinstance(per_task, int) else list(per_task)
    assert got == sizes and sum(got) == TOTAL_CLASSES[dataset]
    assert c.data.class_order_seed == -1 and c.data.partition == "dirichlet" and c.data.min_samples == 6
    assert c.data.augment == augment
    if crop_scale is not None:
        assert tuple(c.data.crop_scale) == pytest.approx(crop_scale)
    assert c.data.test_resize_ratio == pytest.approx(ratio)
    assert tuple(c.data.mean) == pytest.approx(mean) and tuple(c.data.std) == pytest.approx(std)


def test_every_spec_row_has_a_config_and_no_more():
    # the table every configs/paper/*.py file reads its hyperparameters from (loaded by path, as they load it)
    spec = importlib.util.spec_from_file_location("reference_table", os.path.join(REPO, "configs", "paper",
                                                                                  "reference_table.py"))
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    ours = {(d, b) for d, table in rt.HPARAMS.items() for b in table}
    assert ours == {(r[0], r[1]) for r in SPEC_10_5}


@pytest.mark.parametrize("dataset,bad", [("cifar100", "1"), ("eurosat", "0.1"), ("cars196", "abc"), ("cub200", None)])
def test_invalid_beta_lists_valid_ones(dataset, bad):
    valid = [f"{r[1]:g}" for r in SPEC_10_5 if r[0] == dataset]
    with pytest.raises(ValueError) as e:
        paper_config(dataset, bad)
    assert all(v in str(e.value) for v in valid)


def test_beta_spellings():
    assert paper_config("eurosat", "1").data.beta == paper_config("eurosat", "1.0").data.beta == 1.0
    assert paper_config("cifar100", ".05").rank == 16


def test_reproduce_script_lists_all_18_runs():
    import subprocess
    path = os.path.join(REPO, "experiments", "reproduce_paper.sh")
    subprocess.run(["bash", "-n", path], check=True)
    env = dict(os.environ, DRY_RUN="1", VIT_NPZ="/v.npz", TFDS_DIR="/t")
    out = subprocess.run(["bash", path], env=env, check=True, capture_output=True, text=True).stdout
    runs = [line for line in out.splitlines() if "lorm-jax run" in line]
    assert len(runs) == 18
    for dataset, beta, *_ in SPEC_10_5:
        assert any(f"configs/paper/{dataset}.py:{beta:g} " in r and f"runs/paper/{dataset}_b{beta:g}" in r
                   and "--config.backbone.options.path=/v.npz" in r and "--config.data.options.data_dir=/t" in r
                   for r in runs), (dataset, beta)


# ----------------------------------------------------------------------------------------------------------------------
# One engine round per dataset on mocked TFDS data (tiny ViT, 32 px host resize)

TFDS_NAME = {"cifar100": "cifar100", "imagenet_r": "imagenet_r", "imagenet_a": "imagenet_a",
             "cub200": "caltech_birds2011", "cars196": "cars196", "eurosat": "eurosat/rgb"}
SPARSE = {"imagenet_r", "imagenet_a"}  # labels are ImageNet-1k ids, 200 of them used
# the TFDS splits each loader reads: the official train / test, or one split it divides 80/20 itself
SPLITS = {"cifar100": ("train", "test"), "imagenet_r": ("test",), "imagenet_a": ("test",),
          "cub200": ("train", "test"), "cars196": ("train", "test"), "eurosat": ("train",)}


def _mock_examples(dataset: str) -> int:
    """Smallest number of mock examples whose labels cover every class (ImageNet-R/A: exactly 200 distinct ids; mock
    labels are uniform over the 1000 ImageNet classes). Mock data is a deterministic function of the example index."""
    cap = 4000
    with tfds.testing.mock_data(num_examples=cap, policy=USE_CODE):
        src = tfds.data_source(TFDS_NAME[dataset], split=SPLITS[dataset][0])
        seen = set()
        for i in range(cap):
            seen.add(int(src[i]["label"]))
            if len(seen) == TOTAL_CLASSES[dataset]:
                # a single-split dataset is divided 80/20: leave a margin so most classes keep test samples
                return i + 1 if dataset in SPARSE else (i + 1) * (3 if len(SPLITS[dataset]) == 1 else 1)
    raise AssertionError(f"{dataset}: {cap} mock examples do not cover {TOTAL_CLASSES[dataset]} classes")


def cpu_config(dataset: str, beta):
    c = paper_config(dataset, beta)
    c.backbone.name = "tiny_vit"
    c.backbone.options = {"image_size": 16, "patch": 4, "width": 32, "depth": 1, "heads": 2, "mlp": 32, "seed": 0}
    options = c.data.options.to_dict()
    options.update(data_dir=None, image_size=32)  # inside mock_data: no prepared copy needed
    options.pop("manual_dir", None)
    c.data.options = options
    c.num_clients, c.epochs, c.rounds, c.data.min_samples = 2, 1, 1, 1
    c.rank = 2  # one rank for all datasets: the merge's small eager computations compile once (ranks: see above)
    c.gram_augment = False  # halves the Gram pass's compile time; training still runs each dataset's augmentation
    c.eval_batch_size = 64
    return c


# Engine rounds on mock TFDS data are full-suite tests (each compiles its own programs); the fast lane keeps the
# loading, split and registry tests of this file.
ROUND_CASES = [pytest.param(d, b, marks=pytest.mark.slow, id=d) for d, b in (
    ("cifar100", 0.1), ("imagenet_r", 0.5), ("imagenet_a", 1.0), ("cub200", 0.2), ("cars196", 0.2), ("eurosat", 0.5))]


@pytest.mark.parametrize("dataset,beta", ROUND_CASES)
def test_one_engine_round_on_mock_tfds(dataset, beta):
    n = _mock_examples(dataset)
    c = cpu_config(dataset, beta)
    with tfds.testing.mock_data(num_examples=n, policy=USE_CODE):
        setup = plan.build_setup(c)
    ds = setup.dataset
    sizes = PROTOCOL[dataset][1]
    assert ds.name == PROTOCOL[dataset][0] and ds.num_classes == TOTAL_CLASSES[dataset]
    assert ds.image_shape == (32, 32, 3) and ds.x_train.dtype == np.uint8
    assert (ds.counts("train") > 0).all(), "every class has training samples"
    assert setup.num_tasks == len(sizes) and np.diff(setup.offsets).tolist() == sizes
    assert setup.offsets[-1] == TOTAL_CLASSES[dataset]
    for t, idx in enumerate(setup.task_train):  # task t holds exactly the labels [offset_t, offset_t+1)
        labels = np.unique(ds.y_train[idx])
        assert labels.min() >= setup.offsets[t] and labels.max() < setup.offsets[t + 1]
        assert len(labels) == sizes[t]
    info = tfds_data.split_info(ds.name)
    assert (info["n_train"], info["n_test"]) == (len(ds.y_train), len(ds.y_test))
    state = rounds.initial_state(setup)
    new, metrics = rounds.run_round(setup, state, 0, 0)
    assert np.isfinite(metrics["loss"]) and metrics["factor"] == "B" and not metrics["excluded_clients"]
    assert sum(metrics["client_samples"]) == len(setup.task_train[0])
    changed = [not np.allclose(new["lora"][p]["B"], state["lora"][p]["B"]) for p in state["lora"]]
    assert any(changed), "round 0 trains B"
    chex.assert_tree_all_finite(new["head"])


# ----------------------------------------------------------------------------------------------------------------------
# Splits and checksums

def _load_mock(name, n, **options):
    options.setdefault("image_size", 8)
    with tfds.testing.mock_data(num_examples=n, policy=USE_CODE):
        return D.load(name, **options)


def test_split_checksum_is_deterministic_and_seeded():
    a = _load_mock("tfds/eurosat/rgb", 200, split_seed=3)
    info_a = tfds_data.split_info("eurosat/rgb")
    b = _load_mock("tfds/eurosat/rgb", 200, split_seed=3)
    info_b = tfds_data.split_info("tfds/eurosat/rgb")
    assert info_a == info_b and info_a["split_seed"] == 3 and len(info_a["index_sha256"]) == 64
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    _load_mock("tfds/eurosat/rgb", 200, split_seed=4)
    info_c = tfds_data.split_info("eurosat/rgb")
    assert info_c["index_sha256"] != info_a["index_sha256"] and info_c["n_train"] == info_a["n_train"]
    json.dumps(info_a)  # goes into results.json
    # stratified 80/20: per class round(0.2 n_c) (at least 1, at most n_c - 1) test images
    n_c = a.counts("train") + a.counts("test")
    expected = np.where(n_c < 2, 0, np.clip(np.round(0.2 * n_c), 1, n_c - 1))
    np.testing.assert_array_equal(a.counts("test"), expected)
    # the checksum function itself
    s1 = tfds_data.split_checksums(np.array([0, 2]), np.array([1]), ["a", "c"], ["b"])
    assert s1 == tfds_data.split_checksums([0, 2], [1], ("a", "c"), ("b",))
    assert s1["index_sha256"] != tfds_data.split_checksums([0, 1], [2])["index_sha256"]


def test_imagenet_r_labels_map_to_sorted_ids():
    n = _mock_examples("imagenet_r")
    ds = _load_mock("tfds/imagenet_r", n)
    assert ds.num_classes == 200 and list(ds.class_names) == sorted(ds.class_names)  # wnids ascending
    assert ds.class_names[0].startswith("n0")
    info = tfds_data.split_info("imagenet_r")
    assert info["split"].startswith("ours") and info["n_train"] + info["n_test"] == n


def test_official_split_and_max_examples():
    ds = _load_mock("tfds/cifar100", 50, max_examples=20)
    assert (len(ds.y_train), len(ds.y_test)) == (20, 20) and ds.num_classes == 100
    info = tfds_data.split_info("cifar100")
    assert info["split"] == "official TFDS train/test" and info["split_seed"] is None


def test_variable_size_images_need_a_host_resize():
    with pytest.raises(D.DatasetFormatError, match="image_size > 0"):
        _load_mock("tfds/imagenet_a", 40, image_size=0)


def test_unknown_option_and_registry():
    for name in tfds_data.NAMES:
        assert name in D.available()
    with pytest.raises(ValueError, match="bogus"):
        D.load("tfds/cifar100", bogus=1)
    with pytest.raises(ValueError, match="manual_dir"):
        D.load("tfds/cifar100", data_dir="/x", manual_dir="/y")


# ----------------------------------------------------------------------------------------------------------------------
# Real (non-mock) reading: missing / wrong-format copies, a hand-prepared ArrayRecord copy, Cars from original files

def test_missing_copy_errors_say_what_to_do(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="tfds build cifar100 --file_format=array_record"):
        D.load("tfds/cifar100", data_dir=str(tmp_path))
    with pytest.raises(D.DatasetNotFoundError, match="does not exist"):
        D.load("tfds/imagenet_r", data_dir=str(tmp_path / "nope"))
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load("tfds/cars196", data_dir=str(tmp_path))
    assert "dead upstream" in str(e.value) and "manual_dir" in str(e.value) and "cars196/<version>" in str(e.value)
    folder = tmp_path / "eurosat" / "rgb" / "2.0.0"  # prepared with the default TFRecord format
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"name": "eurosat", "splits": [{"name": "train"}]}))
    with pytest.raises(D.DatasetNotFoundError, match="ArrayRecord"):
        D.load("tfds/eurosat/rgb", data_dir=str(tmp_path))


def _png(a):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_hand_prepared_array_record_copy_reads_without_tensorflow(tmp_path):
    """A real ArrayRecord copy in cifar100's on-disk layout (prepared here without TF: PNG bytes are stored as is)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)

    class Cifar100(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=100),
                "coarse_label": tfds.features.ClassLabel(num_classes=20)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(8)), "test": self._generate_examples(range(8, 12))}

        def _generate_examples(self, ids):
            for i in ids:  # ids sort as strings: train_07 < train_10 …
                yield str(i), {"id": f"img_{i:02d}", "image": _png(images[i]), "label": 3 * i, "coarse_label": 0}

    Cifar100(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert "tensorflow" not in sys.modules
    ds = D.load("tfds/cifar100", data_dir=str(tmp_path), image_size=0)
    np.testing.assert_array_equal(ds.x_train, images[:8])  # canonical order = sorted ids, pixels exact
    np.testing.assert_array_equal(ds.y_train, 3 * np.arange(8))
    np.testing.assert_array_equal(ds.y_test, 3 * np.arange(8, 12))
    info = tfds_data.split_info("cifar100")
    assert info["tfds_version"] == "3.0.2" and str(tmp_path) in info["source"]
    big = D.load("tfds/cifar100", data_dir=str(tmp_path), image_size=48)
    from PIL import Image
    ref = np.asarray(Image.fromarray(images[0]).resize((48, 48), Image.BICUBIC))
    np.testing.assert_array_equal(big.x_train[0], ref)


def test_host_resize_short_side_center_crop():
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:40, 1] = 255
    img[:, 40:, 2] = 255
    out = tfds_data.host_resize(img, 20, "short_side_crop")  # shorter side already 20: a pure centre crop
    assert out.shape == (20, 20, 3) and (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()
    assert tfds_data.host_resize(img[..., 0], 10, "squash").shape == (10, 10, 3)  # grey -> RGB


def test_cars_from_original_files(tmp_path):
    sio = pytest.importorskip("scipy.io")
    from PIL import Image
    names = np.array([f"Car {i}" for i in range(196)], dtype=object)
    (tmp_path / "devkit").mkdir()
    sio.savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for split, ann_path, n in (("cars_train", tmp_path / "devkit" / "cars_train_annos.mat", 5),
                               ("cars_test", tmp_path / "cars_test_annos_withlabels.mat", 3)):
        (tmp_path / split).mkdir()
        ann = np.zeros((1, n), dtype=fields)
        for i in range(n):
            fname = f"{i + 1:05d}.jpg"
            Image.new("RGB", (30 + 7 * i, 24), (10 * i, 0, 0)).save(tmp_path / split / fname)
            ann[0, i] = (1, 1, 20, 20, 196 - i, fname)
        sio.savemat(ann_path, {"annotations": ann})
    ds = D.load("tfds/cars196", manual_dir=str(tmp_path), image_size=16)
    assert ds.num_classes == 196 and ds.class_names[0] == "Car 0"
    assert ds.x_train.shape == (5, 16, 16, 3) and ds.x_test.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(ds.y_train, 195 - np.arange(5))
    assert tfds_data.split_info("cars196")["tfds_version"] == "manual"
    os.remove(tmp_path / "cars_test" / "00002.jpg")
    with pytest.raises(D.DatasetNotFoundError, match="missing"):
        D.load("tfds/cars196", manual_dir=str(tmp_path), image_size=16)
