"""Ground truths for the proxy leaderboard: sampled plans with measured quality, one command each.

    .venv/bin/python benchmarks/ground_truth.py --model smollm2       # 300 LM plans
    .venv/bin/python benchmarks/ground_truth.py --model fashion-cnn   # 1,000 CNN plans

LM (SmolLM2-135M, the ``llama`` space: RTN 2-8 bits, groups 32/64/128, fp16; q/k/v and
gate/up tied): KL and perplexity on 8 x 256 tokens of Persuasion (held out). Its weights
are dequantized Q4_1, so 4-bit groups of 32 reproduce them exactly: plans rich in u4g32
measure unusually well.

CNN (the residual Fashion-MNIST CNN, trained deterministically and cached; the ``cnn``
space: Conv2d and Linear, RTN 2-8 bits per output channel or groups of 16, fp32): top-1
accuracy, cross-entropy and KL on the 10,000 test images.

Plans are stratified over effective bits (equal counts per bin) and over their distance
from a proxy optimum (0-100% of decisions redrawn from an anchor proxy's MILP plan; the
anchors rotate over the 15 hand-designed proxies). Writes
``benchmarks/results/ground_truth_{lm,cnn}.csv`` (a row per plan, written as it is
measured: rerun to resume), its settings ``.json``, and ``_single.csv``: the measured KL
of every (tensor, format) quantized alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS, machine  # noqa: E402

from mpsearch.run.groundtruth import SamplerConfig, make_ground_truth  # noqa: E402
from mpsearch.run.leaderboard import with_config  # noqa: E402
from mpsearch.run.search import SearchConfig  # noqa: E402
from mpsearch.run.session import Session  # noqa: E402

#: the hand-designed proxies whose MILP plans anchor the samples (never an evolved one:
#: it is fitted on this ground truth)
ANCHORS = (
    "baq",
    "fisher",
    "fit",
    "grad_norm",
    "gram_loss",
    "hawq_v2",
    "hessian_diag",
    "input_moment",
    "input_moment_loss",
    "measured_kl",
    "mse",
    "qvlm_entropy",
    "size",
    "snip",
    "synflow",
)

SETUPS = {
    "smollm2": dict(
        name="lm",
        config=dict(model="smollm2", space="llama", eval_chunks=8, eval_seq_len=256),
        sampler=dict(plans=300, lo=2.5, hi=5.5, bins=6),
    ),
    "fashion-cnn": dict(
        name="cnn",
        config=dict(model="fashion-cnn", space="cnn", calib_chunks=8, gram_chunks=8, eval_chunks=10),
        sampler=dict(plans=1000, lo=2.5, hi=6.5, bins=8),
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SETUPS), default="smollm2")
    ap.add_argument("--plans", type=int, help="how many plans (default: 300 LM, 1000 CNN)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = SETUPS[args.model]
    cfg = SearchConfig(
        **setup["config"], proxies=ANCHORS, budgets=("4",), refine=0, threads=args.threads, progress=True
    )
    sampler = SamplerConfig(**{**setup["sampler"], **({"plans": args.plans} if args.plans else {})}, anchors=ANCHORS)
    out = args.out or RESULTS / f"ground_truth_{setup['name']}.csv"
    session = Session.open(cfg)
    make_ground_truth(session, out, sampler, {"config": with_config(cfg), "machine": machine(args.threads)})
    single = pd.DataFrame(
        [(t, f, v) for (t, f), v in sorted(session.prims.kl.items())], columns=["tensor", "format", "kl"]
    )
    single.to_csv(out.with_name(out.stem + "_single.csv"), index=False)
    print(f"wrote {out} ({sampler.plans} plans) and {out.with_name(out.stem + '_single.csv')} ({len(single)} pairs)")


if __name__ == "__main__":
    main()
