"""Datasets in one simple on-disk layout, downloaded once and then only read.

Layout under ``PTCOURSE_DATA`` (default: ``~/.cache/ptcourse/data``)::

    <name>/<split>.npz     images (uint8, N x H x W or N x H x W x 3) and labels (int64)
    <name>/<split>.jsonl   one {"text": ..., "label": ...} per line
    <name>/meta.json       classes, split sizes, source, sha256 of each file

On first use a missing dataset is downloaded from its canonical source (torchvision for
images, Hugging Face ``datasets`` for text) and written in that layout atomically.

Example:
    >>> from ptcourse import data
    >>> train = data.load("mnist", "train", per_class=10, seed=0)   # 100 images, 10 per digit
    >>> x, y = train[0]            # float tensor [1, 28, 28] in [0, 1], int label
"""
from __future__ import annotations

import hashlib
import json
import os
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import Dataset

from .files import atomic_write

# name -> (kind, splits, how to fetch it)
DATASETS = {
    "mnist": ("image", ("train", "test"), "torchvision.datasets.MNIST"),
    "cifar10": ("image", ("train", "test"), "torchvision.datasets.CIFAR10"),
    "rotten_tomatoes": ("text", ("train", "validation", "test"), "cornell-movie-review-data/rotten_tomatoes"),
    "sst2": ("text", ("train", "validation"), "stanfordnlp/sst2"),
}


class DatasetMissingError(FileNotFoundError):
    """A dataset is not in the cache and could not be downloaded."""


class DatasetCorruptError(RuntimeError):
    """A cached dataset file is truncated or damaged."""


def data_dir() -> Path:
    """The dataset cache folder: ``PTCOURSE_DATA``, else ``~/.cache/ptcourse/data``."""
    env = os.environ.get("PTCOURSE_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ptcourse" / "data"


def cached(name: str) -> dict[str, bool]:
    """Which splits of ``name`` are in the cache, e.g. ``{"train": True, "test": False}``."""
    kind, splits, _ = _spec(name)
    ext = ".npz" if kind == "image" else ".jsonl"
    return {s: (data_dir() / name / f"{s}{ext}").exists() for s in splits}


def classes(name: str) -> list[str]:
    """Class names of a dataset, in label order (read from its ``meta.json``)."""
    return _read_meta(name)["classes"]


# ----------------------------------------------------------------------------- datasets
class ImageDataset(Dataset):
    """Images held in memory as a uint8 tensor ``images`` [N, C, H, W] with ``labels`` [N].

    ``dataset[i]`` returns ``(float image in [0, 1], int label)``, passed through ``transform``
    (any torchvision ``transforms.v2`` transform) when one is given. Whole-dataset tensors
    make batched GPU augmentation and feature extraction easy: ``dataset.images``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], transform=None):
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as floats in [0, 1] (no transform) and the labels."""
        return self.images.float() / 255, self.labels


class TextDataset(Dataset):
    """Sentences with labels; ``dataset[i]`` is ``{"text": str, "label": int}``."""

    def __init__(self, texts: list[str], labels: torch.Tensor, classes: list[str]):
        self.texts, self.labels, self.classes = texts, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"text": self.texts[i], "label": int(self.labels[i])}


# ----------------------------------------------------------------------------- loading
def load(name: str, split: str = "train", limit: int | None = None, seed: int = 0, *,
         per_class: int | None = None, transform=None) -> ImageDataset | TextDataset:
    """Load a dataset split, downloading it into the cache the first time.

    Args:
        name: ``mnist``, ``cifar10``, ``rotten_tomatoes`` or ``sst2``.
        split: e.g. ``train``, ``test``, ``validation`` (see ``DATASETS``).
        limit: keep a deterministic, stratified subset of this many examples
            (class proportions kept); more than exist means all of them, with a warning.
        seed: chooses the subset (and its order).
        per_class: keep exactly this many examples of every class instead (few-label budgets).
        transform: a torchvision transform applied to each image (image datasets only).

    Example:
        >>> ds = load("cifar10", "train", limit=500, seed=1)
        >>> len(ds), ds.classes[0]
        (500, 'airplane')
    """
    kind, splits, _ = _spec(name)
    if split not in splits:
        raise ValueError(f"dataset {name!r} has splits {list(splits)}, not {split!r}.")
    if limit is not None and per_class is not None:
        raise ValueError("give either limit= or per_class=, not both.")
    if not cached(name)[split]:
        download(name)
    meta = _read_meta(name)
    if kind == "image":
        images, labels = _read_npz(data_dir() / name / f"{split}.npz")
    else:
        texts, labels = _read_jsonl(data_dir() / name / f"{split}.jsonl")
    if per_class is not None:
        idx = balanced_indices(labels, per_class, seed)
    elif limit is not None:
        idx = stratified_indices(labels, limit, seed, what=f"{name}/{split}")
    else:
        idx = None
    if idx is not None:
        labels = labels[idx]
        if kind == "image":
            images = images[idx]
        else:
            texts = [texts[i] for i in idx]
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    if kind == "text":
        if transform is not None:
            raise ValueError("transform= is for image datasets; tokenize text in a collate function.")
        return TextDataset(texts, labels_t, meta["classes"])
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    images_t = images_t.unsqueeze(1) if images_t.ndim == 3 else images_t.permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images_t, labels_t, meta["classes"], transform)


def stratified_indices(labels: np.ndarray, limit: int, seed: int = 0, what: str = "the dataset") -> np.ndarray:
    """Indices of a seeded subset of ``limit`` examples with the class proportions of ``labels``.

    Example:
        >>> y = np.array([0] * 90 + [1] * 10)
        >>> np.bincount(y[stratified_indices(y, 20)]).tolist()
        [18, 2]
    """
    labels = np.asarray(labels)
    n = len(labels)
    if limit >= n:
        if limit > n:
            warnings.warn(f"limit={limit} is more than the {n} examples in {what}; using all {n}.",
                          stacklevel=3)
        return np.random.default_rng(seed).permutation(n)
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    quota = counts * limit / n
    take = np.floor(quota).astype(int)
    # hand the remaining slots to the classes with the largest remainders (ties: seeded)
    rest = limit - take.sum()
    order = np.lexsort((rng.random(len(values)), -(quota - take)))
    take[order[:rest]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == v))[:k] for v, k in zip(values, take)]
    return rng.permutation(np.concatenate(chosen))


def balanced_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` seeded examples of every class (in shuffled order).

    Example:
        >>> y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
        >>> np.bincount(y[balanced_indices(y, 2)]).tolist()
        [2, 2, 2]
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for v in np.unique(labels):
        pool = np.flatnonzero(labels == v)
        if per_class > len(pool):
            raise ValueError(f"per_class={per_class} but class {v} has only {len(pool)} examples.")
        chosen.append(rng.permutation(pool)[:per_class])
    return rng.permutation(np.concatenate(chosen))


# ----------------------------------------------------------------------------- reading
def _spec(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; the course has {', '.join(DATASETS)}.")
    return DATASETS[name]


def _corrupt(path: Path, err: Exception) -> DatasetCorruptError:
    return DatasetCorruptError(
        f"The cached file {path} is damaged or truncated ({type(err).__name__}: {err}). "
        f"Delete the folder {path.parent} and run again: the dataset will be downloaded afresh "
        "(or copied again from your lab's shared cache).")


def _read_meta(name: str) -> dict:
    path = data_dir() / name / "meta.json"
    if not path.exists():
        download(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, err) from err


def _read_npz(path: Path):
    try:
        with zipfile.ZipFile(path) as z:
            images, labels = _read_npy(z, "images.npy"), _read_npy(z, "labels.npy")
    except (FileNotFoundError, PermissionError):
        raise
    # a damaged file fails in the zip structure (a flipped byte can name an unknown compression
    # method), in zlib, in the CRC check or in the array header
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, zlib.error, EOFError, ValueError,
            OSError, KeyError, SyntaxError, tokenize.TokenError) as err:
        raise _corrupt(path, err) from err
    if len(images) != len(labels):
        raise _corrupt(path, ValueError(f"{len(images)} images but {len(labels)} labels"))
    return images, labels.astype(np.int64)


def _read_npy(z: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array of an ``.npz``, read to the end of its member so that the zip's CRC check covers
    every byte (``np.load`` stops after the bytes its header asks for: a flipped byte in the header
    that changes the shape would give a wrong array without an error)."""
    with z.open(name) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
        if f.read(1):
            raise ValueError(f"{name} holds more bytes than its header describes")
    return array


def _read_jsonl(path: Path):
    texts, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    texts.append(row["text"])
                    labels.append(int(row["label"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise _corrupt(path, err) from err
    return texts, np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- writing
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_dataset(name: str, splits: dict, classes: list[str], source: str) -> Path:
    """Write ``{split: (images, labels) or (texts, labels)}`` in the cache layout, atomically.

    ``meta.json`` (written last, so its presence means the rest is complete) records the
    class names, split sizes, source and a sha256 of every file.
    """
    folder = data_dir() / name
    files = {}
    for split, (xs, ys) in splits.items():
        if isinstance(xs, np.ndarray):
            path = folder / f"{split}.npz"
            # np.savez_compressed appends .npz to names without it, so write through a file object
            atomic_write(path, lambda f: np.savez_compressed(f, images=xs, labels=np.asarray(ys, dtype=np.int64)))
        else:
            path = folder / f"{split}.jsonl"
            lines = "".join(json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) + "\n"
                            for t, y in zip(xs, ys))
            atomic_write(path, lambda f: f.write(lines.encode("utf-8")))
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    meta = {"name": name, "classes": list(classes), "splits": {s: len(v[1]) for s, v in splits.items()},
            "source": source, "files": files}
    atomic_write(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode("utf-8")))
    return folder


def verify(name: str) -> list[str]:
    """Problems with a cached dataset (missing files, size or checksum mismatches); empty if fine."""
    folder = data_dir() / name
    if not (folder / "meta.json").exists():
        return [f"{name}: not in {data_dir()}"]
    meta = _read_meta(name)
    problems = []
    kind, splits, _ = _spec(name)
    ext = ".npz" if kind == "image" else ".jsonl"
    for split in meta.get("splits", splits):
        path = folder / f"{split}{ext}"
        if not path.exists():
            problems.append(f"{name}: {path.name} missing")
            continue
        rec = meta.get("files", {}).get(path.name)
        if rec:
            if path.stat().st_size != rec["bytes"] or sha256(path) != rec["sha256"]:
                problems.append(f"{name}: {path.name} does not match the size/checksum in meta.json")
            continue
        # no checksum recorded (a cache prepared elsewhere): read it and compare the count
        try:
            n = len((_read_npz(path) if kind == "image" else _read_jsonl(path))[1])
        except DatasetCorruptError as err:
            problems.append(str(err).split(" Delete")[0])
            continue
        if n != meta["splits"][split]:
            problems.append(f"{name}: {path.name} holds {n} examples, meta.json says {meta['splits'][split]}")
    return problems


def download(name: str) -> Path:
    """Download ``name`` from its canonical source into the cache (a no-op when already there).

    Several processes may ask at once (``torchrun`` on an empty cache, ``pytest -n``, a lab's
    shared cache): a lock file per dataset lets one of them download and write while the others
    wait, and each looks at the cache again once it holds the lock, so the dataset is fetched and
    written once and the others read it.
    """
    kind, splits, source = _spec(name)
    if _complete(name):
        return data_dir() / name
    data_dir().mkdir(parents=True, exist_ok=True)
    lock = FileLock(data_dir() / f".{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Waiting for another process that is downloading {name!r} into {data_dir()} ...", flush=True)
        lock.acquire()
    try:
        if _complete(name):
            return data_dir() / name
        try:
            if kind == "image":
                fetched, names = _fetch_torchvision(name)
            else:
                fetched, names = _fetch_hf(name, source, splits)
        except Exception as err:  # noqa: BLE001 - any failure to fetch becomes one clear message
            raise DatasetMissingError(
                f"Dataset {name!r} is not in the cache folder {data_dir() / name} and could not be "
                f"downloaded from {source} ({type(err).__name__}: {str(err)[:200]}).\n"
                f"To fix: connect to the internet and run `python -m ptcourse download {name}`, or point "
                "PTCOURSE_DATA at a folder that already holds it (e.g. your lab's shared cache; "
                "the layout is <name>/<split>.npz|jsonl + meta.json).") from err
        return write_dataset(name, fetched, names, source)
    finally:
        lock.release()


def _complete(name: str) -> bool:
    """Whether every split of ``name`` and its ``meta.json`` (written last) are in the cache."""
    return (data_dir() / name / "meta.json").exists() and all(cached(name).values())


def _fetch_torchvision(name):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    raw = data_dir() / ".downloads"
    out = {}
    for split in ("train", "test"):
        ds = cls(str(raw), train=split == "train", download=True)
        out[split] = (np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
    return out, [str(c).split(" - ")[0] for c in ds.classes]


def _fetch_hf(name, source, splits):
    """Each split of a Hugging Face hub dataset as (texts, labels); labels 0 = negative, 1 = positive."""
    import datasets

    out = {}
    for split in splits:
        ds = datasets.load_dataset(source, split=split)
        text_col = "sentence" if "sentence" in ds.column_names else "text"
        labels = np.asarray(ds["label"], dtype=np.int64)
        names = getattr(ds.features.get("label"), "names", None)
        if names is not None and [str(n)[:3].lower() for n in names] != ["neg", "pos"]:
            raise ValueError(f"{source}/{split}: label names {names}, expected negative, positive")
        if len(labels) and (labels.min() < 0 or labels.max() > 1):
            raise ValueError(f"{source}/{split}: labels outside 0..1 (an unlabelled split has -1)")
        out[split] = (list(ds[text_col]), labels)
    return out, ["negative", "positive"]
