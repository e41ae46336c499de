"""Tests for ncjax.data (offline: TFDS mock data, generated IDX files and image folders)."""
import gzip
import itertools
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import fig11
from ncjax import data
from ncjax.data import sources


def _ds(n_per_class, k=3, hw=(4, 4), c=1, seed=0):
    """Synthetic dataset whose image pixels encode the example index (unique rows)."""
    labels = np.repeat(np.arange(k), n_per_class).astype(np.int32)
    n = len(labels)
    images = np.zeros((n,) + hw + (c,), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    return data.ArrayDataset(images, labels, k, "synthetic", [f"c{i}" for i in range(k)])


def _ids(ds):
    return ds.images[:, 0, 0, 0].astype(int) + 256 * ds.images[:, 0, 1, 0].astype(int)


# ---------------------------------------------------------------------------------------------
# ArrayDataset


def test_array_dataset_validation_and_defaults():
    ds = data.ArrayDataset(np.zeros((5, 2, 2, 1), np.uint8), np.array([0, 1, 2, 0, 1]), 3)
    assert len(ds) == 5 and ds.labels.dtype == np.int32
    assert ds.class_names == ["0", "1", "2"] and ds.image_shape == (2, 2, 1)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        data.ArrayDataset(np.zeros((5, 2, 2), np.uint8), np.zeros(5), 3)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        data.ArrayDataset(np.zeros((5, 2, 2, 1), np.uint8), np.zeros(4, int), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        data.ArrayDataset(np.zeros((2, 2, 2, 1), np.uint8), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="class_names"):
        data.ArrayDataset(np.zeros((2, 2, 2, 1), np.uint8), np.array([0, 1]), 3, "", ["a"])
    with pytest.raises(ValueError, match="uint8 or float32"):
        data.ArrayDataset(np.zeros((2, 2, 2, 1), np.int16), np.array([0, 1]), 3)


# ---------------------------------------------------------------------------------------------
# TFDS (mock data, offline)

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,tfds_name,k", [("cifar10", "cifar10", 10),
                                               ("CIFAR-100", "cifar100", 100)])
def test_tfds_cifar_mock(name, tfds_name, k):
    with tfds.testing.mock_data(num_examples=6):
        ds = data.materialize(data.load(name, "train"))
        src = tfds.data_source(tfds_name, split="train", download=False)
        expected = np.stack([src[i]["image"] for i in range(6)])
        expected_labels = [int(src[i]["label"]) for i in range(6)]
    assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == k and len(ds.class_names) == k
    np.testing.assert_array_equal(ds.images, expected)
    np.testing.assert_array_equal(ds.labels, expected_labels)


@pytest.mark.parametrize("name,k", [("oxford_iiit_pet", 37), ("dtd", 47)])
def test_tfds_variable_size_needs_decode_size(name, k):
    with tfds.testing.mock_data(num_examples=5):
        lazy = data.load(name, "train", decode_size=(20, 24))
        assert isinstance(lazy.images, data.ImageSource)
        ds = data.materialize(lazy)
        src = tfds.data_source(name, split="train", download=False)
        first = src[0]["image"]
        with pytest.raises(ValueError, match="decode_size"):
            data.load(name, "train")
    assert ds.images.shape == (5, 20, 24, 3) and ds.num_classes == k
    assert isinstance(ds.images, np.ndarray)
    np.testing.assert_array_equal(ds.images[0], data.fit_image(first, (20, 24)))


def test_tfds_mnist_fallback_when_no_idx_files(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        ds = data.load("mnist", "test", data_dir=str(tmp_path))
    assert ds.images.shape == (4, 28, 28, 1) and ds.num_classes == 10


def test_missing_tfds_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds build cifar10") as e:
        data.load("cifar10", "train", data_dir=str(tmp_path))
    assert "data_dir" in str(e.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load("fashion_mnist", "train", data_dir=str(tmp_path))


def test_aircraft_errors_explain_folder_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"<dir>/<split>/<class>"):
        data.load("fgvc_aircraft", "train")
    with pytest.raises(FileNotFoundError, match="images_variant_trainval"):
        data.load(f"folder:{tmp_path}", "train")


# ---------------------------------------------------------------------------------------------
# Image folders


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    (tmp_path / "train" / "b_cls").mkdir(parents=True)
    (tmp_path / "train" / "a_cls").mkdir(parents=True)
    (tmp_path / "test" / "b_cls").mkdir(parents=True)
    Image.fromarray(exact).save(tmp_path / "train" / "b_cls" / "0.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(
        tmp_path / "train" / "b_cls" / "1.jpg")
    Image.fromarray(rng.integers(0, 256, (9, 40), dtype=np.uint8)).save(  # grayscale
        tmp_path / "train" / "a_cls" / "x.PNG")
    (tmp_path / "train" / "a_cls" / "notes.txt").write_text("ignored")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tmp_path / "test" / "b_cls" / "t.jpeg")

    ds = data.load(f"folder:{tmp_path}", "train", decode_size=(16, 12))
    assert isinstance(ds.images, data.ImageSource)  # lazily decoded
    assert ds.class_names == ["a_cls", "b_cls"] and ds.num_classes == 2
    assert ds.images.shape == (3, 16, 12, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, [0, 1, 1])
    np.testing.assert_array_equal(ds.images[1], exact)  # PNG at target size: lossless
    gray = ds.images[0]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    with Image.open(tmp_path / "train" / "b_cls" / "1.jpg") as im:  # 30x20: fitted, not stretched
        np.testing.assert_array_equal(ds.images[2], data.fit_image(np.asarray(im), (16, 12)))

    # One native size no larger than the model's: kept as it is (the device resizes).
    test = data.load(f"folder:{tmp_path}", "test", decode_size=224)
    assert test.class_names == ["a_cls", "b_cls"]  # union over splits: ids agree
    assert test.images.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(test.labels, [1])
    with pytest.raises(ValueError, match="decode_size"):
        data.load(f"folder:{tmp_path}", "train")
    air = data.load("fgvc_aircraft", "test", data_dir=str(tmp_path), decode_size=8)
    np.testing.assert_array_equal(np.asarray(air.images), np.asarray(test.images))


# ---------------------------------------------------------------------------------------------
# IDX files


def _idx_bytes(arr, code):
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


@pytest.mark.parametrize("gz,sep", [(True, "-"), (False, "-"), (False, ".")])
def test_idx_round_trip(tmp_path, gz, sep):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 5, 6), dtype=np.uint8)
        labels = rng.integers(0, 4, n).astype(np.uint8)
        for kind, arr, ndim in (("images", images, 3), ("labels", labels, 1)):
            raw = _idx_bytes(arr, 0x08)
            path = tmp_path / (f"{prefix}-{kind}{sep}idx{ndim}-ubyte" + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(raw) if gz else raw)
        ds = data.load(f"idx:{tmp_path}", "train" if prefix == "train" else "test")
        np.testing.assert_array_equal(ds.images, images[..., None])
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.labels.dtype == np.int32


def test_fashion_mnist_from_idx_dir(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([9, 0], np.uint8))
    ds = data.load("fashion_mnist", "train", data_dir=str(tmp_path))
    assert ds.class_names[9] == "Ankle boot" and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images[..., 0], images)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_write_read_idx_dtypes(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data.write_idx(tmp_path / "a.idx", arr)
    out = data.read_idx(tmp_path / "a.idx")
    assert out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


def test_idx_bad_magic_and_size(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x00\x01"))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        data.read_idx(short)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        _idx_bytes(np.zeros((2, 3, 3), np.uint8), 0x08))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8), 0x08))
    with pytest.raises(ValueError, match="3,\\) labels for 2 images"):
        data.load(f"idx:{tmp_path}", "train")
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        data.load(f"idx:{tmp_path}", "test")


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split():
    train, test, full = (data.load("digits", s) for s in ("train", "test", "all"))
    assert full.images.shape == (1797, 8, 8, 1) and full.images.dtype == np.uint8
    assert full.images.max() == 255 and full.num_classes == 10
    assert len(train) + len(test) == 1797
    per_class = np.bincount(full.labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10),
                                  np.round(0.2 * per_class))  # stratified 80/20
    # train and test partition the full set (as multisets of (image, label) rows).
    rows = lambda d: sorted(d.images.reshape(len(d), -1).tobytes()[i * 64:(i + 1) * 64]
                            + bytes([d.labels[i]]) for i in range(len(d)))
    assert sorted(rows(train) + rows(test)) == rows(full)
    again = data.load("digits", "train")
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.labels, train.labels)
    native = data.load("digits", "test", decode_size=224)  # fixed size: never resized on the host
    np.testing.assert_array_equal(native.images, test.images)
    with pytest.raises(ValueError, match="splits"):
        data.load("digits", "validation")


# ---------------------------------------------------------------------------------------------
# subsets


def test_balanced_subset_counts_determinism_and_nesting():
    ds = _ds(600, k=10)
    prev = None
    for size in fig11.TRAIN_SIZES:
        sub = data.balanced_subset(ds, size, seed=3)
        counts = data.class_counts(sub)
        assert len(sub) == size and counts.sum() == size
        assert counts.max() - counts.min() <= (1 if size % 10 else 0)
        ids = set(_ids(sub))
        assert len(ids) == size
        if prev is not None:
            assert prev <= ids  # nested for a fixed seed
        prev = ids
        np.testing.assert_array_equal(sub.labels, ds.labels[sorted(ids)])
    a = data.balanced_subset(ds, 24, seed=0)
    b = data.balanced_subset(ds, 24, seed=0)
    c = data.balanced_subset(ds, 24, seed=1)
    np.testing.assert_array_equal(_ids(a), _ids(b))
    assert not np.array_equal(_ids(a), _ids(c))
    # the remainder goes to different classes for different seeds
    extras = {tuple(data.class_counts(data.balanced_subset(ds, 13, s))) for s in range(6)}
    assert len(extras) > 1


def test_balanced_subset_errors():
    ds = data.ArrayDataset(np.zeros((7, 2, 2, 1), np.uint8), [0, 0, 0, 1, 1, 1, 2], 3, "x",
                           ["cat", "dog", "emu"])
    with pytest.raises(ValueError, match=r"class 2 \('emu'\) has 1 examples"):
        data.balanced_subset(ds, 6, seed=0)
    with pytest.raises(ValueError, match="at least one example per class"):
        data.balanced_subset(ds, 2, seed=0)
    assert data.class_counts(data.balanced_subset(ds, 3, seed=0)).tolist() == [1, 1, 1]


def test_select_classes_relabels_in_given_order():
    ds = _ds(4, k=5)
    sub = data.select_classes(ds, [3, "c1"])
    assert sub.num_classes == 2 and sub.class_names == ["c3", "c1"]
    assert len(sub) == 8
    ids = _ids(sub)
    np.testing.assert_array_equal(sub.labels, np.where(ds.labels[ids] == 3, 0, 1))
    assert set(ds.labels[ids]) == {1, 3}
    down = data.select_classes(ds, range(2, 5))
    np.testing.assert_array_equal(np.bincount(down.labels), [4, 4, 4])
    with pytest.raises(ValueError, match="out of range"):
        data.select_classes(ds, [5])
    with pytest.raises(ValueError, match="repeated"):
        data.select_classes(ds, [1, 1])


# ---------------------------------------------------------------------------------------------
# device pre-processing


def _rand_images(n=16, h=8, w=8, c=3, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, h, w, c))


def test_augment_shapes_dtypes_identity_and_determinism():
    x = _rand_images()
    key = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(data.augment(key, x, 1), x)
    for level in range(1, 6):
        for c in (1, 3):
            xi = x[..., :c]
            y = data.augment(key, xi, level)
            assert y.shape == xi.shape and y.dtype == jnp.float32
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    y1 = data.augment(key, x, 5)
    np.testing.assert_array_equal(y1, data.augment(key, x, 5))
    assert not np.allclose(y1, data.augment(jax.random.PRNGKey(2), x, 5))
    with pytest.raises(ValueError, match="0..5"):
        data.augment(key, x, 6)
    jitted = jax.jit(data.augment, static_argnums=2)
    np.testing.assert_allclose(jitted(key, x, 5), y1, atol=1e-6)
    u8 = (np.asarray(x) * 255).astype(np.uint8)
    assert data.augment(key, u8, 3).dtype == jnp.float32


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_random_crop_is_a_window_of_the_padded_input(pad_mode):
    x = _rand_images()
    y = np.asarray(data.augment(jax.random.PRNGKey(5), x, 2, pad=4, pad_mode=pad_mode))
    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)), mode=pad_mode)
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy, dx in itertools.product(range(9), range(9))
                if np.array_equal(padded[i, dy:dy + 8, dx:dx + 8], y[i])]
        assert hits, f"example {i} is not a window of its padded input"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # independent per-example offsets


def test_flip_is_exact_mirror_and_both_outcomes_occur():
    x = _rand_images()
    y = np.asarray(data.augment(jax.random.PRNGKey(0), x, 3, pad=0))
    x = np.asarray(x)
    same = [np.array_equal(y[i], x[i]) for i in range(16)]
    mirrored = [np.array_equal(y[i], x[i, :, ::-1]) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < 16


def test_colour_jitter_and_grayscale():
    x = _rand_images()
    key = jax.random.PRNGKey(3)
    level3 = data.augment(key, x, 3)
    # zero jitter strength reduces level 4 to level 3 (same keys)
    np.testing.assert_allclose(data.augment(key, x, 4, jitter=(0, 0, 0)), level3, atol=1e-6)
    assert not np.allclose(data.augment(key, x, 4), level3, atol=1e-3)
    # brightness only: every example is its level-3 image times one factor in [0.6, 1.4]
    bright = np.asarray(data.augment(key, x, 4, jitter=(0.4, 0, 0)))
    ref = np.asarray(level3)
    factors = []
    for i in range(len(x)):
        ok = (bright[i] < 1) & (ref[i] > 0.05)
        ratio = bright[i][ok] / ref[i][ok]
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4)
        factors.append(ratio.mean())
    assert 0.6 <= min(factors) < max(factors) <= 1.4
    # saturation only: changes colours but keeps each pixel's luma (where nothing clips)
    sat = np.asarray(data.augment(key, x, 4, jitter=(0, 0, 0.4)))
    luma = np.array([.299, .587, .114])
    inside = np.all((sat > 0) & (sat < 1), axis=-1)
    assert inside.mean() > 0.5 and not np.allclose(sat, ref, atol=1e-3)
    np.testing.assert_allclose((sat @ luma)[inside], (ref @ luma)[inside], atol=1e-5)
    gray = np.asarray(data.augment(key, x, 5, jitter=(0, 0, 0), gray_p=1.0))
    np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-6)
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
    np.testing.assert_allclose(gray[..., 0], np.asarray(level3) @ np.array([.299, .587, .114]),
                               atol=1e-5)
    hue = data.augment(key, x, 4, jitter=(0, 0, 0), hue=0.5)
    assert hue.shape == x.shape and not np.allclose(hue, level3, atol=1e-3)
    # grayscale input: colour ops skipped, brightness/contrast still applied
    g = data.augment(key, x[..., :1], 5)
    assert g.shape == (16, 8, 8, 1)


def test_normalize_resize_preprocess():
    imgs = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1)
    out = data.normalize(imgs, (0.5,), (0.25,))
    np.testing.assert_allclose(np.asarray(out).ravel(), [-2.0, 2.0, -1.2], atol=1e-6)
    assert out.dtype == jnp.float32
    rgb = np.full((2, 4, 4, 3), 255, np.uint8)
    n = np.asarray(data.normalize(rgb, data.IMAGENET_MEAN, data.IMAGENET_STD))
    np.testing.assert_allclose(n[0, 0, 0], (1 - np.array(data.IMAGENET_MEAN))
                               / np.array(data.IMAGENET_STD), rtol=1e-6)
    const = jnp.full((2, 8, 8, 3), 0.3)
    r = data.resize(const, 20)
    assert r.shape == (2, 20, 20, 3)
    np.testing.assert_allclose(r, 0.3, atol=1e-6)
    assert data.resize(const, (8, 8)) is const
    u8 = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    p = data.preprocess(None, u8, mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD,
                        image_size=16, aug_level=5, train=False)
    ref = data.normalize(data.resize(u8.astype(np.float32) / 255, 16), data.CIFAR10_MEAN,
                         data.CIFAR10_STD)
    assert p.shape == (4, 16, 16, 3) and p.dtype == jnp.float32
    np.testing.assert_allclose(p, ref, atol=1e-5)
    pt = data.preprocess(jax.random.PRNGKey(0), u8, mean=data.CIFAR10_MEAN,
                         std=data.CIFAR10_STD, image_size=16, aug_level=5)
    assert pt.shape == p.shape and not np.allclose(pt, p)
    with pytest.raises(ValueError, match="rng"):
        data.preprocess(None, u8, mean=(0.5,), std=(0.5,), aug_level=2)


def test_dataset_stats_and_constants():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    ds = data.ArrayDataset(imgs, np.zeros(10, int), 1)
    mean, std = data.dataset_stats(ds, chunk=3)
    x = imgs.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-8)
    assert data.stats_for("cifar-10") == (data.CIFAR10_MEAN, data.CIFAR10_STD)
    with pytest.raises(ValueError, match="channels"):
        data.stats_for("mnist", channels=3)
    with pytest.raises(KeyError, match="dataset_stats"):
        data.stats_for("dtd")


# ---------------------------------------------------------------------------------------------
# batching


def test_prefetch():
    items = list(data.prefetch(iter(range(10)), size=2, transform=lambda v: v * 2))
    assert items == [2 * i for i in range(10)]

    def failing():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(data.prefetch(failing()))
    it = data.prefetch(iter(range(1000)), size=1)
    assert next(it) == 0
    it.close()  # stops the worker without draining


def test_default_crop_padding_scales_with_the_image():
    """pad=None: H // 8 pixels (4 at CIFAR's 32 px, 1 for the 8 x 8 digits)."""
    x = _rand_images()  # 8 x 8
    y = np.asarray(data.augment(jax.random.PRNGKey(5), x, 2))
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(len(x)):
        assert any(np.array_equal(padded[i, dy:dy + 8, dx:dx + 8], y[i])
                   for dy in range(3) for dx in range(3)), i
    big = jnp.zeros((2, 32, 32, 1)).at[:, 0, 0, 0].set(1.0)  # a marker pixel in the corner
    shifts = set()
    for seed in range(40):
        z = np.asarray(data.augment(jax.random.PRNGKey(seed), big, 2))
        pos = np.argwhere(z[0, :, :, 0] == 1.0)
        if len(pos):
            shifts.add(tuple(pos[0]))
    assert max(max(p) for p in shifts) == 4  # the marker moves by up to 4 pixels at 32 px


def test_folder_path_expands_the_home_directory(tmp_path, monkeypatch):
    """Configs write data paths as "folder:~/..."; the tilde must reach the file system."""
    for split in ("train", "test"):
        d = tmp_path / "data" / split / "cls"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "a.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = data.load("folder:~/data", "train", decode_size=4)
    assert len(ds) == 1 and ds.class_names == ["cls"]


# ---------------------------------------------------------------------------------------------
# Host memory independent of the model's resolution (issue 7 §1)


def test_fit_image_covers_then_crops_the_centre():
    img = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    np.testing.assert_array_equal(data.fit_image(img, (4, 4)), img[:, 2:6])  # scale 1: crop
    tall = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4, 1)
    np.testing.assert_array_equal(data.fit_image(tall, (4, 4)), tall[3:7])
    small = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    up = data.fit_image(small, (4, 4))  # 2x3 -> covers 4x4 at 4x6, then the middle 4 columns
    ref = np.asarray(Image.fromarray(small).resize((6, 4), Image.BILINEAR))[:, 1:5]
    np.testing.assert_array_equal(up, ref)


def _folder(tmp_path, n_per_class=6, size=(12, 10)):
    rng = np.random.default_rng(1)
    for c in range(3):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            h, w = size[0] + i, size[1] + 2 * i  # every image another size
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return f"folder:{tmp_path}"


def test_subsets_are_taken_before_any_image_is_decoded(tmp_path, monkeypatch):
    name = _folder(tmp_path)
    decoded = []
    real = sources._read_image
    monkeypatch.setattr(sources, "_read_image", lambda p: decoded.append(p) or real(p))
    ds = data.load(name, "train", decode_size=8)
    ds = data.select_classes(ds, [2, 0])
    sub = data.balanced_subset(ds, 4, seed=0)
    assert decoded == [] and isinstance(sub.images, data.ImageSource)
    out = data.materialize(sub)
    assert len(decoded) == 4 and out.images.shape == (4, 8, 8, 3)
    # The same rows as decoding everything and then subsetting.
    full = data.materialize(data.load(name, "train", decode_size=8))
    every = full.take(np.flatnonzero(np.isin(full.labels, [0, 2])))
    rows = {im.tobytes() for im in every.images}
    assert all(im.tobytes() in rows for im in out.images)


def test_over_budget_splits_stream_through_training_and_eval(tmp_path):
    from ncjax import train
    ds = data.load(_folder(tmp_path), "train", decode_size=8)
    assert data.materialize(ds, budget_mb=0) is ds  # over budget: stays lazy
    whole = data.materialize(ds)
    x = np.asarray(ds.images[np.asarray([5, 1, 7])])
    np.testing.assert_array_equal(x, whole.images[[5, 1, 7]])
    # train.predict reads the lazy rows in padded batches, like an in-memory array.
    lazy = np.concatenate([o for o, _ in train.predict(_sum_rows, ds.images, 4)])
    eager = np.concatenate([o for o, _ in train.predict(_sum_rows, whole.images, 4)])
    np.testing.assert_array_equal(lazy, eager)
    assert lazy.shape == (len(ds),)


def _sum_rows(x):
    return x.astype(np.int32).sum(axis=(1, 2, 3))


@pytest.mark.parametrize("native,size,channels,std", [
    ((8, 8, 1), 32, 1, data.MNIST_STD), ((28, 28, 1), 224, 3, data.FASHION_MNIST_STD),
    ((32, 32, 3), 224, 3, data.CIFAR10_STD), ((32, 32, 3), 20, 3, data.CIFAR10_STD)])
def test_device_resize_matches_the_old_host_resize(native, size, channels, std):
    """Batches at native resolution resized on the device (what runs now) equal the batches
    the pipeline used to build by resizing every image on the host with PIL (bilinear) and
    storing uint8, within PIL's uint8 rounding."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4,) + native, dtype=np.uint8)
    smooth = np.asarray(jax.image.resize(x.astype(np.float32), x.shape, "linear"))
    x = np.clip(np.round(smooth), 0, 255).astype(np.uint8)
    mean = (0.5,) * len(std)
    prep = data.Preprocess(np.asarray(mean, np.float32), np.asarray(std, np.float32),
                           image_size=size, channels=channels)
    on_device = np.asarray(prep(None, x, False))

    def pil(im):  # the host path this replaces (PIL bilinear, antialiased when shrinking)
        im = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        out = np.asarray(im.resize((size, size), Image.BILINEAR))
        return out[..., None] if out.ndim == 2 else out

    host = np.stack([pil(im) for im in x])
    on_host = np.asarray(prep(None, host, False))
    assert on_device.shape == on_host.shape == (4, size, size, channels)
    # PIL rounds to uint8 (0.5/255) after fixed-point weights (a few pixels in 1e5 land one
    # level off); in normalised units:
    tol = 1.5 / 255 / min(std)
    np.testing.assert_allclose(on_device, on_host, atol=tol)
    assert np.abs(on_device - on_host).mean() < 0.35 / 255 / min(std)  # ~ rounding alone


# ---------------------------------------------------------------------------------------------
# Few-shot benchmarks: CIFAR-FS (both CIFAR-100 splits pooled) and miniImageNet (CSV + folder)

def _counting_source(images, labels, names, reads, what):
    """A lazy dataset over `images` whose decoded rows are appended to `reads`."""
    def read(ids):
        reads.extend((what, i) for i in ids)
        return [images[i] for i in ids]
    return data.ArrayDataset(data.ImageSource(read, np.arange(len(labels)), images.shape[1:],
                                              fit=False, name=what),
                             labels, len(names), what, list(names))


def test_concatenate_stays_lazy_and_reads_each_part():
    reads = []
    a = _counting_source(np.full((3, 2, 2, 1), 1, np.uint8), [0, 1, 1], "xy", reads, "a")
    b = _counting_source(np.full((2, 2, 2, 1), 2, np.uint8), [1, 0], "xy", reads, "b")
    ab = data.concatenate([a, b])
    np.testing.assert_array_equal(ab.labels, [0, 1, 1, 1, 0])
    assert isinstance(ab.images, data.ImageSource) and not reads
    np.testing.assert_array_equal(ab.images[[4, 0, 3]][:, 0, 0, 0], [2, 1, 2])
    assert sorted(reads) == [("a", 0), ("b", 0), ("b", 1)]
    eager = data.concatenate([data.materialize(a), data.materialize(b)])
    assert isinstance(eager.images, np.ndarray) and len(eager) == 5
    with pytest.raises(ValueError, match="different classes"):
        data.concatenate([a, _counting_source(np.zeros((1, 2, 2, 1), np.uint8), [0], "xz",
                                              reads, "c")])


def _fake_cifar100(monkeypatch, per_split=(5, 1)):
    """CIFAR-100 stand-in for `data._load_tfds`: `per_split` images a class in train / test,
    pixel (0, 0) = the class, (0, 1) = 0 for train / 1 for test, (0, 2) = the row; decodes
    are recorded."""
    from ncjax import fewshot
    reads = []

    def load_tfds(name, split, data_dir, hw):
        assert name == "cifar100"
        n = per_split[split == "test"]
        labels = np.repeat(np.arange(100), n)
        images = np.zeros((len(labels), 4, 4, 3), np.uint8)
        images[:, 0, 0, 0], images[:, 0, 1, 0] = labels, split == "test"
        images[:, 0, 2, 0] = np.arange(len(labels)) % 256
        return _counting_source(images, labels, data.CIFAR100_LABEL_NAMES, reads,
                                f"cifar100:{split}")
    monkeypatch.setattr(sources, "_load_tfds", load_tfds)
    return reads


def test_cifar_fs_pools_both_cifar100_splits_lazily(monkeypatch):
    """Each CIFAR-FS class has all its CIFAR-100 images (train + test: 5 + 1 here, 500 + 100
    really); train/test divide the meta-train classes' images 90/10 per class; nothing is
    decoded until rows are read, and then only those rows."""
    from ncjax import fewshot
    reads = _fake_cifar100(monkeypatch)
    meta_test = data.load("cifar_fs", "meta_test")
    assert not reads and isinstance(meta_test.images, data.ImageSource)
    assert meta_test.class_names == sorted(data.CIFAR_FS_CLASSES["test"])
    np.testing.assert_array_equal(np.bincount(meta_test.labels), [6] * 20)
    ds = data.materialize(meta_test)
    assert len(reads) == 120  # only the 20 classes' rows
    ids = data.cifar_fs_class_ids("test")
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], ids[ds.labels])  # labels match images
    assert sorted(ds.images[:, 0, 1, 0]) == [0] * 100 + [1] * 20  # both splits' images
    assert len(data.load("cifar_fs", "meta_val").class_names) == 16
    full, train, test = (data.load("cifar_fs", s) for s in ("meta_train", "train", "test"))
    assert train.class_names == test.class_names == full.class_names and len(full.class_names) == 64
    np.testing.assert_array_equal(np.bincount(test.labels), [1] * 64)  # round(10% of 6)
    np.testing.assert_array_equal(np.bincount(train.labels), [5] * 64)
    rows = lambda d: {tuple(r[0, :3, 0]) for r in data.materialize(d).images}
    assert rows(train) | rows(test) == rows(full) and not rows(train) & rows(test)
    assert (train.name, test.name) == ("cifar_fs:train", "cifar_fs:test")
    again = data.load("cifar_fs", "test")  # the same held-out images every time
    assert rows(again) == rows(test)
    with pytest.raises(ValueError, match="meta_test"):
        data.load("cifar_fs", "validation")


def test_cifar_fs_through_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=300):
        ds = data.load("cifar_fs", "meta_test")
        src = [tfds.data_source("cifar100", split=s, download=False) for s in ("train", "test")]
        labels = np.concatenate([[int(x[i]["label"]) for i in range(len(x))] for x in src])
        first = data.materialize(ds.take([0])).images[0]
    from ncjax import fewshot
    ids = data.cifar_fs_class_ids("test")
    assert len(ds) == np.isin(labels, ids).sum() and ds.num_classes == 20
    assert first.shape == (32, 32, 3)


def _mini_imagenet(root, classes=(("train", 4), ("val", 2), ("test", 5)), per_class=10):
    """A tiny miniImageNet: 8x8 PNGs of noise brighter by class, whose pixel (0, 0) is the
    row of its CSV; CSVs 'filename,label' with WordNet-like ids."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    wnid = 0
    for split, k in classes:
        lines = ["filename,label"]
        for c in range(k):
            wnid += 1
            for i in range(per_class):
                name = f"n{wnid:08d}{i:08d}.png"
                im = (rng.integers(0, 64, (8, 8, 3)) + 16 * (wnid % 12)).astype(np.uint8)
                im[0, 0, 0] = len(lines) - 1
                Image.fromarray(im).save(root / "images" / name)
                lines.append(f"{name},n{wnid:08d}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_mini_imagenet_splits(tmp_path):
    _mini_imagenet(tmp_path)
    src = f"mini_imagenet:{tmp_path}"
    test = data.load(src, "meta_test")
    assert isinstance(test.images, data.ImageSource) and test.images.shape == (50, 8, 8, 3)
    assert test.class_names == [f"n{w:08d}" for w in range(7, 12)]
    np.testing.assert_array_equal(np.bincount(test.labels), [10] * 5)
    np.testing.assert_array_equal(data.materialize(test).images[:, 0, 0, 0], np.arange(50))
    assert data.load(src, "meta_val").num_classes == 2
    train, held = data.load(src, "train"), data.load(src, "test")
    assert train.num_classes == held.num_classes == 4 and train.class_names == held.class_names
    np.testing.assert_array_equal(np.bincount(held.labels), [1] * 4)
    np.testing.assert_array_equal(np.bincount(train.labels), [9] * 4)
    rows = lambda d: set(data.materialize(d).images[:, 0, 0, 0])
    assert rows(train) | rows(held) == set(range(40)) and not rows(train) & rows(held)
    assert data.load(src, "meta_test", decode_size=4).images.shape == (50, 4, 4, 3)


def test_mini_imagenet_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.csv not found.*Ravi & Larochelle"):
        data.load(f"mini_imagenet:{tmp_path}", "meta_test")
    with pytest.raises(FileNotFoundError, match=r"mini_imagenet:<dir>"):
        data.load("mini_imagenet", "train")


def test_holdout_mask_is_stratified_and_seeded():
    labels = np.repeat([3, 7], [10, 20])
    m = data.holdout_mask(labels, 0.1, 0)
    assert m[labels == 3].sum() == 1 and m[labels == 7].sum() == 2
    np.testing.assert_array_equal(m, data.holdout_mask(labels, 0.1, 0))
    assert not np.array_equal(m, data.holdout_mask(labels, 0.1, 1))
