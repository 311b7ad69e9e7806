"""Tests for lorm_jax.data.datasets (parsers on tiny tmp fixtures; real files when installed)."""
import gzip
import os
import struct

import numpy as np
import pytest

from lorm_jax.data import datasets as D

FASHION = D.FASHION_MNIST_DIR
WORDNET = D.WORDNET_DIR
has_fashion = os.path.isfile(os.path.join(FASHION, "train-images-idx3-ubyte.gz"))
has_wordnet = os.path.isfile(os.path.join(WORDNET, "data.noun"))


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "i" * arr.ndim, *arr.shape) + arr.tobytes()


def _write(path, data: bytes, gz=True):
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


# --------------------------------------------------------------------------------------------- idx / Fashion-MNIST
def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(D.read_idx(_write(tmp_path / "a.gz", _idx_bytes(a))), a)
    np.testing.assert_array_equal(D.read_idx(_write(tmp_path / "a", _idx_bytes(a), gz=False)), a)
    b = np.array([1, -2, 300], dtype=">i4")
    out = D.read_idx(_write(tmp_path / "b.gz", _idx_bytes(b, 0x0C)))
    np.testing.assert_array_equal(out, [1, -2, 300])
    assert out.dtype == np.dtype("int32")


def test_read_idx_errors_name_the_file(tmp_path):
    a = np.zeros((4, 5, 5), np.uint8)
    good = _idx_bytes(a)
    cases = {
        "trunc_payload.gz": (_write(tmp_path / "trunc_payload.gz", good[:-7]), "truncated"),
        "trailing.gz": (_write(tmp_path / "trailing.gz", good + b"xx"), "trailing"),
        "badmagic.gz": (_write(tmp_path / "badmagic.gz", b"\x01\x02" + good[2:]), "magic"),
        "header.gz": (_write(tmp_path / "header.gz", good[:9]), "header"),
    }
    gz = gzip.compress(good)
    cases["trunc_stream.gz"] = (_write(tmp_path / "trunc_stream.gz", gz[: len(gz) // 2], gz=False), "gzip")
    cases["garbage.gz"] = (_write(tmp_path / "garbage.gz", b"this is not gzip at all", gz=False), "gzip")
    for name, (path, word) in cases.items():
        with pytest.raises(D.DatasetFormatError) as ei:
            D.read_idx(path)
        assert name in str(ei.value) and word in str(ei.value), (name, str(ei.value))


def _fake_fashion_dir(tmp_path, n_tr=12, n_te=5):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_tr), ("t10k", n_te)):
        _write(tmp_path / f"{prefix}-images-idx3-ubyte.gz", _idx_bytes(rng.integers(0, 256, (n, 28, 28), np.uint8)))
        _write(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", _idx_bytes((np.arange(n) % 10).astype(np.uint8)))
    return str(tmp_path)


def test_fashion_loader_on_fixture(tmp_path):
    ds = D.load("fashion_mnist", data_dir=_fake_fashion_dir(tmp_path))
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10 and ds.kind == "image"
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_fashion_missing_and_fallback(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as ei:
        D.load("fashion_mnist", data_dir=str(tmp_path))
    msg = str(ei.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "digits" in msg
    with pytest.warns(RuntimeWarning, match="digits"):
        ds = D.load_with_fallback("fashion_mnist", data_dir=str(tmp_path))
    assert ds.name == "digits"
    with pytest.raises(D.DatasetNotFoundError, match="wordnet-base"):
        D.load_with_fallback("wordnet_nouns", data_dir=str(tmp_path))


def test_fashion_corrupt_file_named(tmp_path):
    d = _fake_fashion_dir(tmp_path)
    p = os.path.join(d, "t10k-labels-idx1-ubyte.gz")
    raw = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(D.DatasetFormatError, match="t10k-labels-idx1-ubyte.gz"):
        D.load("fashion_mnist", data_dir=d)


@pytest.mark.skipif(not has_fashion, reason="dataset-fashion-mnist not installed")
def test_fashion_real():
    ds = D.load("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10
    np.testing.assert_array_equal(ds.counts("train"), 6000)
    np.testing.assert_array_equal(ds.counts("test"), 1000)


# --------------------------------------------------------------------------------------------------------- WordNet
_WN_HEADER = (
    "  1 Invented licence header line one for the test fixture.  \n"
    "  2 Invented licence header line two.  \n"
    "  3   \n"
)
_WN_LINES = [  # offset lexfile ss_type w_cnt (word lex_id)* p_cnt (ptr)* | gloss
    "00000001 05 n 01 grok 0 001 @ 00000002 n 0000 | a small furry test creature; \"the grok slept\"  ",
    "00000002 05 n 02 blip 0 blop 0 000 | a bigger test creature  ",
    "00000003 05 n 01 zorp 0 000 | an animal that hums; it also sings; \"zorps hum\"  ",
    "00000004 05 n 01 quix 0 000 | a striped creature  ",
    "00000005 05 n 01 mell 0 000 | a creature of the deep  ",
    "00000006 09 n 01 thinkum 0 000 | a made-up idea; \"a thinkum\"  ",
    "00000007 09 n 01 notion_x 0 000 | another concept  ",
    "00000008 09 n 01 plan_y 0 000 | a scheme of things  ",
    "00000009 18 n 01 tester 0 002 @ 00000010 n 0000 ~ 00000011 n 0000 | a person who tests  ",
    "00000010 18 n 01 coder 0 000 | a person who writes code; \"coders code\"  ",
]


def _wordnet_dir(tmp_path, lexnames=None):
    (tmp_path / "data.noun").write_text(_WN_HEADER + "\n".join(_WN_LINES) + "\n")
    if lexnames:
        (tmp_path / "lexnames").write_text(lexnames)
    return str(tmp_path)


def test_parse_wordnet_fixture(tmp_path):
    d = _wordnet_dir(tmp_path)
    texts, lex = D.parse_wordnet_data(os.path.join(d, "data.noun"), first_clause=True)
    assert len(texts) == 10 and lex.tolist() == [5] * 5 + [9] * 3 + [18] * 2
    assert texts[0] == "a small furry test creature"
    assert texts[2] == "an animal that hums"
    full, _ = D.parse_wordnet_data(os.path.join(d, "data.noun"), first_clause=False)
    assert full[2] == 'an animal that hums; it also sings; "zorps hum"'


def test_wordnet_loader_fixture(tmp_path):
    d = _wordnet_dir(tmp_path)
    ds = D.load("wordnet_nouns", data_dir=d, test_fraction=0.2, seed=0)
    assert ds.kind == "text" and ds.x_train.dtype == object
    assert ds.class_names == ("noun.animal", "noun.cognition", "noun.person")
    np.testing.assert_array_equal(ds.counts("test"), [1, 1, 1])
    np.testing.assert_array_equal(ds.counts("train"), [4, 2, 1])
    texts = set(ds.x_train.tolist()) | set(ds.x_test.tolist())
    assert "a person who writes code" in texts and len(texts) == 10
    ds2 = D.load("wordnet_nouns", data_dir=d, test_fraction=0.2, seed=0)
    assert ds.x_test.tolist() == ds2.x_test.tolist()
    # a lexnames file, when present, overrides the embedded list
    (tmp_path / "x").mkdir()
    d2 = _wordnet_dir(tmp_path / "x", lexnames="05 noun.beast 1\n")
    assert D.load("wordnet_nouns", data_dir=d2).class_names == ("noun.beast", "noun.cognition", "noun.person")


def test_wordnet_missing_and_malformed(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="sudo apt-get install wordnet-base"):
        D.load("wordnet_all", data_dir=str(tmp_path))
    (tmp_path / "data.noun").write_text(_WN_HEADER + "00000001 xx n 01 a 0 000 | gloss\n")
    with pytest.raises(D.DatasetFormatError, match="data.noun"):
        D.load("wordnet_nouns", data_dir=str(tmp_path))


def test_embedded_lexnames():
    assert len(D.WORDNET_LEXNAMES) == 45
    assert D.WORDNET_LEXNAMES[3] == "noun.Tops" and D.WORDNET_LEXNAMES[28] == "noun.time"
    assert D.WORDNET_LEXNAMES[44] == "adj.ppl"


@pytest.mark.skipif(not has_wordnet, reason="wordnet-base not installed")
def test_wordnet_real():
    nouns = D.load("wordnet_nouns")
    assert len(nouns.y_train) + len(nouns.y_test) == 82115 and nouns.num_classes == 26
    assert nouns.class_names[0] == "noun.Tops" and nouns.class_names[-1] == "noun.time"
    tot = nouns.counts("train") + nouns.counts("test")
    assert tot[nouns.class_names.index("noun.artifact")] == 11587
    assert tot[nouns.class_names.index("noun.motive")] == 42
    allp = D.load("wordnet_all")
    assert len(allp.y_train) + len(allp.y_test) == 117659 and allp.num_classes == 45
    frac = len(allp.y_test) / 117659
    assert 0.19 < frac < 0.21
    assert all(isinstance(t, str) and t for t in allp.x_train[:1000])


# ------------------------------------------------------------------------------------------ digits / synthetic / misc
def test_digits():
    ds = D.load("digits")
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.uint8
    assert len(ds.y_train) + len(ds.y_test) == 1797 and ds.num_classes == 10
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert abs(len(ds.y_test) / 1797 - 0.25) < 0.01
    np.testing.assert_array_equal(D.load("digits").x_test, ds.x_test)


def test_synthetic_images():
    a = D.load("synthetic_images", seed=3)
    b = D.load("synthetic_images", seed=3)
    c = D.load("synthetic_images", seed=4)
    assert a.x_train.shape == (360, 16, 16, 3) and a.x_test.shape == (120, 16, 16, 3)
    assert a.x_train.dtype == np.uint8
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    np.testing.assert_array_equal(a.counts(), 60)
    d = D.load("synthetic_images", seed=3, n_train=10)
    np.testing.assert_array_equal(d.x_test, a.x_test)  # test set independent of n_train
    # classes are separable from pixels (nearest class mean) but not from the mean colour alone
    x_tr = a.x_train.reshape(len(a.x_train), -1).astype(float)
    x_te = a.x_test.reshape(len(a.x_test), -1).astype(float)
    means = np.stack([x_tr[a.y_train == k].mean(0) for k in range(6)])
    pred = np.argmin(((x_te[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == a.y_test).mean() > 0.9
    col = lambda x: x.reshape(len(x), -1, 3).mean(1)  # noqa: E731
    cm = np.stack([col(a.x_train)[a.y_train == k].mean(0) for k in range(6)])
    pred_c = np.argmin(((col(a.x_test)[:, None] - cm[None]) ** 2).sum(-1), 1)
    assert (pred_c == a.y_test).mean() < 0.6


def test_synthetic_text():
    a = D.load("synthetic_text", seed=0)
    b = D.load("synthetic_text", seed=0)
    assert a.kind == "text" and a.x_train.dtype == object and len(a.x_train) == 360
    assert a.x_train.tolist() == b.x_train.tolist()
    assert a.x_train.tolist() != D.load("synthetic_text", seed=1).x_train.tolist()
    # class keyword sets are disjoint: a keyword seen in class c never appears in another class
    vocab = [set(" ".join(a.x_train[a.y_train == c]).split()) for c in range(6)]
    shared = set.intersection(*vocab)
    own = [v - shared for v in vocab]
    for i in range(6):
        for j in range(i + 1, 6):
            assert not own[i] & own[j]
    big = D.load("synthetic_text", num_classes=40, n_train=2, n_test=1)
    assert big.num_classes == 40 and len(set(big.class_names)) == 40


def test_subsample_and_select_classes():
    ds = D.load("digits")
    s = D.subsample_per_class(ds, 20, 5, seed=0)
    np.testing.assert_array_equal(s.counts("train"), 20)
    np.testing.assert_array_equal(s.counts("test"), 5)
    s2 = D.subsample_per_class(ds, 20, 7, seed=0)
    np.testing.assert_array_equal(s.x_train, s2.x_train)  # train choice independent of n_test
    assert not np.array_equal(s.x_train, D.subsample_per_class(ds, 20, 5, seed=1).x_train)
    big = D.subsample_per_class(ds, 10_000, None, seed=0)
    assert len(big.y_train) == len(ds.y_train) and len(big.y_test) == len(ds.y_test)
    sel = D.select_classes(ds, [7, 2])
    assert sel.class_names == ("7", "2") and sel.num_classes == 2
    np.testing.assert_array_equal(sel.counts("train"), [np.sum(ds.y_train == 7), np.sum(ds.y_train == 2)])


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names: .*digits.*fashion_mnist"):
        D.load("cifar100")
    with pytest.raises(ValueError, match="unexpected keyword"):
        D.load("digits", not_an_option=1)
    assert "wordnet_all" in D.available()


def test_stratified_split():
    y = np.repeat(np.arange(3), [10, 2, 1])
    tr, te = D.stratified_split(y, 0.3, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(13))
    np.testing.assert_array_equal(np.bincount(y[te], minlength=3), [3, 1, 0])
