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


# ----------------------------------------------------------------------------- the online path, for real
# The real fetch functions on small data in the real formats: torchvision's MNIST / CIFAR-10 files
# served over HTTP from 127.0.0.1 (the dataset class's URL and checksums pointed at them), and real
# `datasets.Dataset` objects with the hub datasets' columns and features.
import gzip  # noqa: E402
import hashlib  # noqa: E402
import http.server  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import tarfile  # noqa: E402
import threading  # noqa: E402


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A folder served at http://127.0.0.1:<port>/ for the duration of a test."""
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_mnist_downloads_from_torchvisions_real_files(http_folder, tmp_path, monkeypatch):
    import torchvision
    root, url = http_folder
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    served, resources = {}, []
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        served[prefix] = (images, labels)
        for kind, header, body in (("images-idx3", [2051, n, 28, 28], images), ("labels-idx1", [2049, n], labels)):
            raw = gzip.compress(np.array(header, dtype=">i4").tobytes() + body.tobytes())
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(raw)
            resources.append((f"{prefix}-{kind}-ubyte.gz", md5(raw)))
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    test = data.load("mnist", "test")
    assert test.classes == [str(d) for d in range(10)]  # torchvision says "0 - zero"
    assert test.images.shape == (5, 1, 28, 28) and test.images.dtype == torch.uint8
    assert np.array_equal(test.images[:, 0].numpy(), served["t10k"][0])
    assert test.labels.tolist() == served["t10k"][1].tolist()
    assert len(data.load("mnist", "train")) == 12 and data.verify("mnist") == []


def test_cifar10_downloads_from_torchvisions_real_archive(http_folder, tmp_path, monkeypatch):
    import torchvision
    root, url = http_folder
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files, sums = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)  # CIFAR rows: 1024 R, 1024 G, 1024 B
        files[name] = {"batch_label": name, "labels": rng.integers(0, 10, 3).tolist(), "data": rows,
                       "filenames": [f"{name}_{j}.png" for j in range(3)]}
    files["batches.meta"] = {"label_names": names, "num_cases_per_batch": 3, "num_vis": 3072}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in files.items():
            raw = pickle.dumps(obj, protocol=2)
            sums[name] = md5(raw)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    (root / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", url + "cifar-10-python.tar.gz")
    monkeypatch.setattr(cls, "tgz_md5", md5(buf.getvalue()))
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": sums["batches.meta"]})
    test = data.load("cifar10", "test")
    assert test.classes == names and test.images.shape == (3, 3, 32, 32)
    expected = files["test_batch"]["data"].reshape(3, 3, 32, 32)  # channel-first, red first
    assert np.array_equal(test.images.numpy(), expected)
    assert test.labels.tolist() == files["test_batch"]["labels"]
    train = data.load("cifar10", "train")
    first = torch.from_numpy(files["data_batch_1"]["data"].reshape(3, 3, 32, 32))
    assert len(train) == 15 and torch.equal(train.images[:3], first)


def _hub_like(name, split):
    """A real datasets.Dataset with the columns and features of the hub dataset."""
    import datasets
    if name == "stanfordnlp/sst2":
        features = datasets.Features({"idx": datasets.Value("int32"), "sentence": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["negative", "positive"])})
        rows = {"idx": [0, 1, 2], "sentence": [f"{split} great film ", f"{split} dull", f"{split} fine"],
                "label": [1, 0, 1]}
    else:
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["neg", "pos"])})
        rows = {"text": [f"{split} a mess", f"{split} a joy"], "label": [0, 1]}
    return datasets.Dataset.from_dict(rows, features=features, split=split)


@pytest.mark.parametrize("name", ["sst2", "rotten_tomatoes"])
def test_text_datasets_download_through_datasets(name, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path))
    calls = []

    def load_dataset(path, *args, split=None, **kwargs):
        calls.append((path, split))
        return _hub_like(path, split)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _, splits, source = data.DATASETS[name]
    ds = data.load(name, splits[-1])
    assert calls == [(source, s) for s in splits]
    assert ds.classes == ["negative", "positive"]
    first = _hub_like(source, splits[-1])
    text_col = "sentence" if "sentence" in first.column_names else "text"
    assert [ds[i]["text"] for i in range(len(ds))] == first[text_col]
    assert ds.labels.tolist() == first["label"]
    assert data.verify(name) == []


def test_text_dataset_with_unexpected_labels_is_refused(tmp_path, monkeypatch):
    """A hub dataset whose label names changed order, or an unlabelled split (-1), must not be cached."""
    import datasets
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path))
    swapped = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: swapped)
    with pytest.raises(data.DatasetMissingError, match="label"):
        data.download("rotten_tomatoes")
    unlabelled = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [-1, -1]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: unlabelled)
    with pytest.raises(data.DatasetMissingError, match="label"):
        data.download("sst2")
    assert not (tmp_path / "sst2" / "meta.json").exists()


def test_any_flipped_byte_in_a_cached_npz_gives_the_clear_error_or_the_right_data(tmp_path, monkeypatch):
    """A byte flipped on a shared drive (or by a bad copy), anywhere in the file: reading it fails
    in zlib, in the zip's CRC check or in the array header, and each must say which file and what to
    do, like a truncated file. (A flip in a zip timestamp changes nothing and reads fine.)"""
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path))
    images = (np.arange(100 * 8 * 8 * 3) % 7).astype(np.uint8).reshape(100, 8, 8, 3)  # compressible
    data.write_dataset("cifar10", {"train": (images, np.arange(100) % 3), "test": (images[:5], np.zeros(5))},
                       ["a", "b", "c"], "test")
    path = tmp_path / "cifar10" / "train.npz"
    good = path.read_bytes()
    outcomes = set()
    for i in range(len(good)):
        flipped = bytearray(good)
        flipped[i] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            ds = data.load("cifar10", "train")
        except data.DatasetCorruptError as err:
            assert "train.npz" in str(err) and "Delete the folder" in str(err)
            outcomes.add("clear error")
        else:
            assert torch.equal(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2)), f"byte {i}"
            outcomes.add("read fine")
    assert "clear error" in outcomes
