"""Fashion-MNIST loader on the real Debian IDX files (and the Hub fallback on the project's test Hub)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from recipes.image_datasets import CLASS_NAMES, DEBIAN_DIR, load_fashion_mnist, read_idx

DATA_DIR = os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR)  # where the loader looks first
HAVE_DEBIAN = all(
    os.path.isfile(os.path.join(DATA_DIR, f"{p}-ubyte.gz"))
    for p in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
)
_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
_ABSENT = f"Fashion-MNIST IDX files absent ({DATA_DIR}; apt-get install dataset-fashion-mnist)"
needs_idx = pytest.mark.skipif(not HAVE_DEBIAN, reason=_ABSENT)  # compares against the raw files
needs_data = pytest.mark.skipif(  # runs from the Hub copy when online
    not HAVE_DEBIAN and _OFFLINE, reason=f"{_ABSENT} and HF_HUB_OFFLINE=1"
)


@pytest.fixture(scope="module")
def raw():
    """The raw arrays, read once per module."""
    return {
        split: (
            read_idx(os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz")),
            read_idx(os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz")),
        )
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }


@needs_idx
def test_idx_files_have_the_published_shapes(raw):
    (train_x, train_y), (test_x, test_y) = raw["train"], raw["test"]
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28)
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10


@needs_idx
def test_class_subset_is_relabelled_with_real_names_and_real_pixels(raw):
    classes = [3, 4, 6, 7, 9]
    data = load_fashion_mnist(classes, train_size=50, test_size=25, seed=0)
    assert set(data) == {"train", "test"}
    assert data["train"].num_rows == 50 and data["test"].num_rows == 25
    for split in ("train", "test"):
        features = data[split].features
        assert type(features["image"]).__name__ == "Image"
        assert features["label"].names == ["Dress", "Coat", "Shirt", "Sneaker", "Ankle boot"]
    assert np.bincount(data["train"]["label"]).tolist() == [10] * 5
    assert np.bincount(data["test"]["label"]).tolist() == [5, 5, 5, 5, 5]

    # every image is a real 28x28 grayscale Fashion-MNIST image of the class its new label names
    images, labels = raw["train"]
    original_labels_of = {}
    for image, label in zip(images, labels, strict=True):
        original_labels_of.setdefault(image.tobytes(), set()).add(int(label))
    for row in data["train"]:
        assert row["image"].mode == "L" and row["image"].size == (28, 28)
        assert classes[row["label"]] in original_labels_of[np.asarray(row["image"]).tobytes()]


@needs_data
def test_subsets_are_deterministic_and_nested():
    a = load_fashion_mnist([0, 1], train_size=20, test_size=2, seed=7)
    b = load_fashion_mnist([0, 1], train_size=20, test_size=2, seed=7)
    c = load_fashion_mnist([0, 1], train_size=20, test_size=2, seed=8)
    bigger = load_fashion_mnist([0, 1], train_size=40, test_size=2, seed=7)

    def pixels(ds):
        return [np.asarray(im).tobytes() for im in ds["image"]]

    assert pixels(a["train"]) == pixels(b["train"]) and a["train"]["label"] == b["train"]["label"]
    assert pixels(a["train"]) != pixels(c["train"])
    assert set(pixels(a["train"])) < set(pixels(bigger["train"]))


@needs_data
def test_all_classes_by_default_and_names_accepted():
    data = load_fashion_mnist(train_size=20, test_size=10)
    assert data["train"].features["label"].names == list(CLASS_NAMES)
    assert np.bincount(data["train"]["label"]).tolist() == [2] * 10
    by_name = load_fashion_mnist(["Bag", "Trouser"], train_size=4, test_size=2)
    assert by_name["train"].features["label"].names == ["Bag", "Trouser"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes": [3, 10]}, "0..9"),
        ({"classes": [3, 3]}, "duplicates"),
        ({"classes": ["Jacket"]}, "Unknown Fashion-MNIST class name"),
        ({"classes": 3}, "sequence"),
        ({"train_size": 0}, "positive integer"),
        ({"classes": [0], "train_size": 6001}, "only 6000 exist"),
    ],
)
@needs_data
def test_bad_arguments_fail_clearly(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_fashion_mnist(**kwargs)


def test_missing_files_offline_say_how_to_get_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(data_dir=tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_fashion_mnist([0, 1])


def test_corrupt_idx_file_is_reported(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(bad)


@needs_idx
def test_hub_fallback_loads_by_name_from_the_test_hub(hub, tmp_path, monkeypatch):
    """No IDX files: the loader pulls `zalando-datasets/fashion_mnist` via `datasets`, like a real user."""
    import datasets

    hub_names = ["T - shirt / top", *CLASS_NAMES[1:]]  # the Hub copy spells class 0 differently
    local = load_fashion_mnist(train_size=20, test_size=10, seed=3)
    for split in ("train", "test"):
        local[split].cast_column("label", datasets.ClassLabel(names=hub_names)).push_to_hub(
            "zalando-datasets/fashion_mnist", split=split
        )
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))  # empty: no IDX files

    data = load_fashion_mnist([8, 5], train_size=4, test_size=2, seed=0)
    assert data["train"].features["label"].names == ["Bag", "Sandal"]  # our names, not the Hub's spelling
    assert np.bincount(data["train"]["label"]).tolist() == [2, 2]
    pixels = {
        np.asarray(im).tobytes(): lab
        for im, lab in zip(local["train"]["image"], local["train"]["label"], strict=True)
    }
    for row in data["train"]:
        assert pixels[np.asarray(row["image"]).tobytes()] == [8, 5][row["label"]]
