"""Benchmark: a user's own ImageNet-style conv net passed as an object, time and peak memory by batch size.

Issue 27 tried a 4.6M-weight conv net with depthwise convolutions through the old route and
saw 7.4 GB of peak memory. Here the same kind of net goes through
``mpsearch.search(model=net, data=BatchData(...), space="cnn")``: a MobileNet-style net (a
stem, 13 depthwise-separable blocks, a classifier; 4.2M weights, untrained: time and
memory do not depend on the values) on 3 x 224 x 224 inputs, Fisher proxy, uniform-4-bit
budget (per output channel), baselines, no refinement, on an empty cache. Each batch size
runs in its own process, so each peak is its own. The peak is the largest resident memory
of any stage (``stages.csv``'s ``peak_rss_mb``).

Writes ``benchmarks/results/user_objects.csv``: ``batch_size, calibration_images,
evaluation_images, weights, seconds, primitives_seconds, peak_rss_mb, peak_stage, plans``.

    .venv/bin/python benchmarks/user_objects.py [--batch-sizes 16 64 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd
from foundation import RESULTS  # noqa: E402  (same folder)

CALIB_BATCHES = 8  # the search's calib_chunks default


def mobilenet():
    """MobileNet-V1-style: widths 32..1024, strides as in the paper; 3.2M conv and 1.0M classifier weights."""
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> list:
        return [
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    plan = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    plan += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for cin, cout, s in plan:
        layers += block(cin, cout, s)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


def one(batch_size: int, threads: int) -> dict:
    """One search in this process."""
    import torch

    import mpsearch
    from mpsearch import BatchData, LabelledBatches

    torch.manual_seed(0)
    net = mobilenet()
    g = torch.Generator().manual_seed(0)
    n_cal, n_eval = CALIB_BATCHES * batch_size, 4 * batch_size

    def images(n: int) -> LabelledBatches:
        x, y = torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 1000, (n,), generator=g)
        return LabelledBatches(x, y, batch_size)

    data = BatchData(images(n_cal), images(n_eval), name="random 224x224 images")
    t0 = time.perf_counter()
    res = mpsearch.search(
        model=net,
        data=data,
        space="cnn",
        budgets=("uniform:4:-1",),
        proxies=("fisher",),
        refine=0,
        threads=threads,
        device="cpu",
        progress=False,
        out_dir=tempfile.mkdtemp(prefix="mpsearch-objects-"),
    )
    seconds = time.perf_counter() - t0
    st = res.stages
    return {
        "batch_size": batch_size,
        "calibration_images": n_cal,
        "evaluation_images": n_eval,
        "weights": sum(p.numel() for p in net.parameters()),
        "seconds": round(seconds, 1),
        "primitives_seconds": round(float(st[st.stage.str.startswith("primitives")].seconds.sum()), 1),
        "peak_rss_mb": round(float(st.peak_rss_mb.max()), 1),
        "peak_stage": str(st.stage[st.peak_rss_mb.idxmax()]),
        "plans": int(res.table.kind.ne("reference").sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one batch size, JSON out
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.threads)))
        return
    rows = []
    for bs in a.batch_sizes:
        env = {**os.environ, "MPSEARCH_CACHE": tempfile.mkdtemp(prefix="mpsearch-bench-")}
        cmd = [sys.executable, __file__, "--one", str(bs), "--threads", str(a.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(RESULTS / "user_objects.csv", index=False)


if __name__ == "__main__":
    main()
