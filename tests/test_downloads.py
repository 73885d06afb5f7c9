"""Several processes fetch the same missing dataset at once (torchrun with 4 processes on an empty
cache, ``pytest -n 2`` on a fresh machine, a lab's shared cache): one downloads and writes the
cache, the others wait for it and read it.

The processes run the real fetch code: torchvision's MNIST download from a local HTTP server
that serves small files in MNIST's real format slowly (so that the processes overlap), and a
stand-in ``datasets.load_dataset`` that returns real ``datasets.Dataset`` objects after a pause
(the hub is not reachable here).
"""
import gzip
import hashlib
import http.server
import multiprocessing
import threading
import time

import numpy as np
import pytest

from ptcourse import data

PROCESSES = 3
PAUSE_S = 0.4  # each download takes this long: every process starts before the first one ends


def mnist_files(root):
    """Small MNIST files in torchvision's format (gzip'd idx), written to ``root``; returns the
    (name, md5) resources list and the test split's images and labels."""
    rng = np.random.default_rng(0)
    resources = []
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        for kind, header, body in (("images-idx3", [2051, n, 28, 28], images), ("labels-idx1", [2049, n], labels)):
            raw = gzip.compress(np.array(header, dtype=">i4").tobytes() + body.tobytes())
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(raw)
            resources.append((f"{prefix}-{kind}-ubyte.gz", hashlib.md5(raw).hexdigest()))
    return resources, images, labels


@pytest.fixture
def slow_server(tmp_path, monkeypatch):
    """A folder served at http://127.0.0.1:<port>/, each file after a pause; counts the requests."""
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    requests = []

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def do_GET(self):
            requests.append(self.path)
            time.sleep(PAUSE_S)
            super().do_GET()

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", requests
    server.shutdown()
    server.server_close()


def _process(cache, url, resources, start, log, results):
    """One process of the run: fetch MNIST, then SST-2, at the same moment as the others; puts
    what it read (or the error) in ``results``."""
    import os
    os.environ["PTCOURSE_DATA"] = str(cache)
    import datasets
    import torchvision

    from ptcourse import data

    torchvision.datasets.MNIST.mirrors = [url]
    torchvision.datasets.MNIST.resources = resources

    def load_dataset(path, *args, split=None, **kwargs):  # the hub, slowly
        with open(log / f"hub.{os.getpid()}.{split}", "w"):
            pass
        time.sleep(PAUSE_S)
        features = datasets.Features({"sentence": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["negative", "positive"])})
        return datasets.Dataset.from_dict({"sentence": [f"{split} good", f"{split} bad"], "label": [1, 0]},
                                          features=features, split=split)
    datasets.load_dataset = load_dataset
    write = data.write_dataset

    def logged_write(name, *args, **kwargs):
        with open(log / f"write.{name}.{os.getpid()}", "w"):
            pass
        return write(name, *args, **kwargs)
    data.write_dataset = logged_write
    out = {}
    for name, split in (("mnist", "test"), ("sst2", "validation")):
        try:
            start.wait(timeout=240)  # all processes ask at the same moment
            ds = data.load(name, split)
            out[name] = (ds.images.numpy(), ds.labels.numpy()) if name == "mnist" else [ds[i]["text"] for i in range(len(ds))]
        except BaseException as err:  # noqa: BLE001 - the parent reports what went wrong
            out[name] = f"{type(err).__name__}: {err}"
    results.put(out)


@pytest.mark.slow
def test_processes_that_fetch_a_dataset_at_once_download_and_write_it_once(slow_server, tmp_path, monkeypatch):
    import torchvision
    root, url, requests = slow_server
    resources, images, labels = mnist_files(root)
    # what one process alone requests (torchvision asks for each file more than once)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path / "alone"))
    data.load("mnist", "test")
    alone = sorted(requests)
    requests.clear()
    cache, log = tmp_path / "cache", tmp_path / "log"
    log.mkdir()
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(cache, url, resources, start, log, results))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [out[name] for out in got for name in out if isinstance(out[name], str)]
    assert not errors, errors
    for out in got:
        assert np.array_equal(out["mnist"][0][:, 0], images) and np.array_equal(out["mnist"][1], labels)
        assert out["sst2"] == ["validation good", "validation bad"]
    assert sorted(requests) == alone                                          # the files fetched once
    writes = sorted(p.name.rsplit(".", 1)[0] for p in log.glob("write.*"))
    assert writes == ["write.mnist", "write.sst2"]                            # each dataset written once
    assert len(list(log.glob("hub.*"))) == 2                                  # sst2's two splits, once each
    monkeypatch.setenv("PTCOURSE_DATA", str(cache))
    assert data.verify("mnist") == [] and data.verify("sst2") == []
