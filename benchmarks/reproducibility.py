"""Why a CPU run gives other bits on another machine, and what pinning the kernels costs.

Trains a small convolutional network and a small transformer for 30 Adam steps from fixed seeds, in
a fresh process per setting, and prints a digest of the final weights and the time per step:

* the same settings twice (same machine): the same digest, so the run itself is deterministic;
* each kernel family made to use other vector instructions (``ATEN_CPU_CAPABILITY``,
  ``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``) and another thread count: another digest, which is what
  another processor (AVX-512 instead of AVX2) or another core count does to a chapter's numbers;
* :data:`ptcourse.runtime.PINNED_CPU_KERNELS` (what ``python -m ptcourse run --record`` sets):
  its digest and its time per step against the default.

Run it alone (other programs change the times, not the digests):
    python benchmarks/reproducibility.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r'''
import hashlib, json, time, torch, torch.nn as nn
torch.manual_seed(0)
conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2),
                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(128, 4, 256, batch_first=True, dropout=0.0), 2)
x, y, s = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)), torch.randn(32, 48, 128)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
for name, model, loss in [("conv", conv, lambda: nn.functional.cross_entropy(conv(x), y)),
                          ("transformer", enc, lambda: enc(s).pow(2).mean())]:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.perf_counter()
    for _ in range(30):
        opt.zero_grad(); loss().backward(); opt.step()
    out[name + "_ms"] = (time.perf_counter() - start) / 30 * 1000
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    out[name] = h.hexdigest()[:12]
print(json.dumps(out))
'''


def run(env: dict) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from ptcourse.runtime import PINNED_CPU_KERNELS
    threads = os.cpu_count() or 1
    settings = [("default", {}), ("default, again", {}),
                ("ATen kernels without vectors", {"ATEN_CPU_CAPABILITY": "default"}),
                ("oneDNN limited to SSE4.1", {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
                ("MKL pinned to AVX2 (CBWR)", {"MKL_CBWR": "AVX2"}),
                ("one thread", {"OMP_NUM_THREADS": "1"}),
                ("pinned (run --record)", dict(PINNED_CPU_KERNELS)),
                ("pinned, again", dict(PINNED_CPU_KERNELS))]
    print(f"{'setting':32s}{'ATen':>9}{'threads':>8}  {'conv':12s} {'transformer':12s} {'conv ms':>8} {'tf ms':>8}")
    base = None
    for label, env in settings:
        r = run(env)
        base = base or r
        same = lambda k: "=" if r[k] == base[k] else " "  # noqa: E731
        print(f"{label:32s}{r['capability']:>9}{r['threads']:>8}  {r['conv']}{same('conv')} "
              f"{r['transformer']}{same('transformer')} {r['conv_ms']:8.1f} {r['transformer_ms']:8.1f}")
    print(f"('=' marks the default's digest; {threads} cores here)")


if __name__ == "__main__":
    main()
