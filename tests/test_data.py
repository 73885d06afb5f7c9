import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ptcourse import data


def test_stratified_subset_is_deterministic_and_keeps_proportions():
    y = np.array([0] * 600 + [1] * 300 + [2] * 100)
    a, b = data.stratified_indices(y, 100, seed=3), data.stratified_indices(y, 100, seed=3)
    assert np.array_equal(a, b)
    assert np.bincount(y[a]).tolist() == [60, 30, 10]
    assert len(set(a.tolist())) == 100
    assert not np.array_equal(a, data.stratified_indices(y, 100, seed=4))


def test_stratified_subset_rounds_to_the_exact_limit():
    y = np.array([0] * 5 + [1] * 5 + [2] * 5)
    idx = data.stratified_indices(y, 7, seed=0)
    assert len(idx) == 7 and sorted(np.bincount(y[idx]).tolist()) == [2, 2, 3]


def test_limit_above_size_uses_all_and_warns():
    y = np.arange(10) % 2
    with pytest.warns(UserWarning, match="more than the 10 examples"):
        idx = data.stratified_indices(y, 50)
    assert sorted(idx.tolist()) == list(range(10))


def test_balanced_subset():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    idx = data.balanced_indices(y, 5, seed=1)
    assert np.bincount(y[idx]).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="has only 10"):
        data.balanced_indices(y, 11)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(60) % 3
    data.write_dataset("cifar10", {"train": (images, labels), "test": (images[:30], labels[:30])},
                       ["a", "b", "c"], "test")
    data.write_dataset("sst2", {"train": (["good", "bad"] * 10, [1, 0] * 10),
                                "validation": (["ok", "meh"], [1, 0])}, ["negative", "positive"], "test")
    return tmp_path


def test_image_dataset_roundtrip_and_transform(cache):
    ds = data.load("cifar10", "train", limit=30, seed=0)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert np.bincount(ds.labels.numpy()).tolist() == [10, 10, 10]
    flipped = data.load("cifar10", "train", limit=30, seed=0, transform=lambda t: t.flip(-1))
    assert torch.equal(flipped[0][0], x.flip(-1))
    assert data.verify("cifar10") == []


def test_text_dataset(cache):
    ds = data.load("sst2", "train", per_class=3)
    assert len(ds) == 6 and set(ds[0]) == {"text", "label"}
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_missing_dataset_offline_names_dataset_folder_and_fix(cache, monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("no internet")
    monkeypatch.setattr(data, "_fetch_hf", offline)
    with pytest.raises(data.DatasetMissingError) as err:
        data.load("rotten_tomatoes", "train")
    text = str(err.value)
    assert "rotten_tomatoes" in text and str(cache) in text
    assert "python -m ptcourse download rotten_tomatoes" in text and "PTCOURSE_DATA" in text


def test_truncated_file_gives_a_clear_error(cache):
    path = cache / "cifar10" / "train.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(data.DatasetCorruptError, match=r"damaged or truncated.*Delete the folder"):
        data.load("cifar10", "train")
    assert data.verify("cifar10")  # the checksum in meta.json no longer matches


def test_corrupt_jsonl_gives_a_clear_error(cache):
    (cache / "sst2" / "train.jsonl").write_text('{"text": "x", "label": 1}\n{"text": ', encoding="utf-8")
    with pytest.raises(data.DatasetCorruptError, match="train.jsonl"):
        data.load("sst2", "train")


def test_unknown_names_are_explained(cache):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="has splits"):
        data.load("sst2", "test")


def test_download_writes_layout_atomically(tmp_path, monkeypatch):
    """The download path: fetch (faked), then write the standard layout with checksums."""
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path))
    fake = {"train": (np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 0, 1])),
            "test": (np.ones((2, 28, 28), np.uint8), np.array([1, 0]))}
    monkeypatch.setattr(data, "_fetch_torchvision", lambda name: (fake, ["0", "1"]))
    ds = data.load("mnist", "test")
    assert ds.images.shape == (2, 1, 28, 28) and ds.classes == ["0", "1"]
    meta = json.loads((tmp_path / "mnist" / "meta.json").read_text())
    assert meta["splits"] == {"train": 4, "test": 2} and set(meta["files"]) == {"train.npz", "test.npz"}
    assert not list((tmp_path / "mnist").glob("*.tmp")) and not list((tmp_path / "mnist").glob(".*"))
