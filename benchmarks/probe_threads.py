"""How long does a linear probe's fit take after PyTorch has run, with two BLAS threads and with one?

Chapter 02 fits about 170 logistic regressions (scikit-learn, lbfgs) on frozen CNN features, in the
same process that has just trained the CNN. This script does what the chapter does, on the same data:
it computes a random-init small CNN's features of chapter 02's 4,000 CIFAR-10 training images (so
PyTorch's own threads have run), then fits chapter 02's probe for each ``C`` on five labelled draws of
``--per-class`` images per class, interleaved round by round:

    (a) ``ptcourse.probes.logistic_probe`` as scikit-learn comes: OpenBLAS with as many threads as it starts with
    (b) ``ptcourse.probes.fit_logistic_probe``: the same pipeline under one BLAS thread

It prints the seconds of each fit round, the median ratio (a)/(b), and how many of the 1,000
validation images the two fits predict differently (the fits agree up to lbfgs's tolerance).
Needs CIFAR-10 where ``ptcourse.data`` finds it (``PTCOURSE_DATA`` or a download). Run it on a quiet
machine; it prints the load average.

Usage::

    python benchmarks/probe_threads.py                 # about a minute on 2 cores
    python benchmarks/probe_threads.py --rounds 5 --per-class 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=100, help="labelled images per class (chapter 02: 5, 20, 100)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a, b) per C")
    args = p.parse_args()

    import numpy as np
    import torch
    from threadpoolctl import threadpool_info

    import ptcourse
    from ptcourse.chapters.contrastive_learning import label_splits, small_cnn
    from ptcourse.probes import extract_features, fit_logistic_probe, logistic_probe

    train = ptcourse.data.load("cifar10", "train", limit=4000, seed=0)
    val_idx, lab_idx = label_splits(train.labels, 100, [args.per_class], range(5))
    ptcourse.seed_everything(0)
    encoder, _ = small_cnn()
    feats = extract_features(encoder, train.images.float() / 255, device="cpu").numpy().astype(np.float64)
    labels = train.labels.numpy()
    draws = [(feats[lab_idx[(args.per_class, s)]], labels[lab_idx[(args.per_class, s)]]) for s in range(5)]
    fv = feats[val_idx]

    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"torch threads {torch.get_num_threads()}, BLAS threads {blas}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}; 5 draws of {args.per_class} images per class, 192 features")
    print(f"{'C':>6s} {'(a) s':>8s} {'(b) s':>8s} {'(a)/(b)':>8s} {'val preds differing':>20s}")
    for c in (0.01, 0.1, 1.0):
        times, differ = {"a": [], "b": []}, 0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fa = [logistic_probe(c, s).fit(x, y) for s, (x, y) in enumerate(draws)]
            times["a"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fb = [fit_logistic_probe(x, y, c, seed=s) for s, (x, y) in enumerate(draws)]
            times["b"].append(time.perf_counter() - t0)
            differ = sum(int((a.predict(fv) != b.predict(fv)).sum()) for a, b in zip(fa, fb))
        ratio = statistics.median(a / b for a, b in zip(times["a"], times["b"]))
        print(f"{c:6g} {statistics.median(times['a']):8.2f} {statistics.median(times['b']):8.2f} {ratio:8.1f} "
              f"{differ:>14d} of {5 * len(fv)}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
