"""Benchmark: task accuracy next to ppl and KL, plan by plan: do ppl and KL rank plans as tasks do?

    .venv/bin/python benchmarks/tasks.py [--threads 2] [--plans-dir RUN/plans] [--formats u3g64a,u4g64a]

Model SmolLM2-135M (``--model``); held-out text Persuasion. Each plan is measured on
16 x 512 evaluation tokens (ppl, KL to the unquantized model; :class:`mpsearch.measure.evaluate.Evaluator`,
as ``mpsearch evaluate`` does) and on two tasks built from the same text
(:mod:`mpsearch.measure.tasks`): 200 LAMBADA-style cloze items (greedy last word of a sentence)
and 100 four-way continuation items (the true next sentence among three of similar
length; ``mc_acc`` by summed log-likelihood, ``mc_acc_norm`` per byte), contexts of 128 tokens.

Plans: the unquantized reference, uniform RTN plans at ``--formats`` (every block linear
in one format; a format whose group does not divide a layer is skipped) and every plan
JSON in ``--plans-dir`` (e.g. a search run's ``plans/``).

Writes ``benchmarks/results/tasks.csv`` (``plan, effective_bits, ppl, kl, cloze_acc, mc_acc``)
and ``tasks.json``: per plan ``mc_acc_norm``, item counts, Wilson 95% intervals of each
accuracy and seconds; across plans, Spearman and Kendall correlations of ppl and KL with
each accuracy (negative: a lower ppl / KL goes with a higher accuracy). Resumable: plans
already in the json (same items, same evaluation tokens) are not measured again.
``--items 10 --plans 2`` is a quick check of the script, not a result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS, machine  # noqa: E402

from mpsearch.core.format import Format  # noqa: E402
from mpsearch.core.plan import Plan, fingerprint, write_json_atomic  # noqa: E402
from mpsearch.core.space import SearchSpace  # noqa: E402
from mpsearch.cost import plan_bits  # noqa: E402
from mpsearch.measure.evaluate import Evaluator  # noqa: E402
from mpsearch.measure.tasks import TaskEvaluator, TaskSettings, wilson_ci  # noqa: E402
from mpsearch.models import load_model, load_text, token_chunks  # noqa: E402
from mpsearch.models.data import DEFAULT_EVALUATION, conventions  # noqa: E402
from mpsearch.quant import applied  # noqa: E402
from mpsearch.solvers.baselines import uniform_formats  # noqa: E402
from mpsearch.store.cache import tokens_hash  # noqa: E402

FORMATS = "u2g32a,u3g64a,u3g32a,u4g64a,u4g32a,u5g64a,u6g64a,u8g64a"
COLUMNS = ["plan", "effective_bits", "ppl", "kl", "cloze_acc", "mc_acc"]
ACCURACIES = ("cloze_acc", "mc_acc", "mc_acc_norm")


def plans_to_measure(lm, members, formats: list[str], plans_dirs: list[str]) -> list[tuple[str, Plan | None]]:
    """``(name, plan)``: the reference (``None``), the uniform plans, then each folder's plans as
    ``<run>/<file name>`` (``returned@*`` left out: it is a copy of another plan of its run)."""
    out: list[tuple[str, Plan | None]] = [("reference", None)]
    decisions, fp = SearchSpace.from_file("llama").build(lm.model), fingerprint(lm.model)
    for key in formats:
        try:
            fmts = uniform_formats(decisions, Format.parse(key))
        except ValueError as e:
            print(f"skipping uniform {key}: {e}", flush=True)
            continue
        out.append(
            (
                f"uniform:{key}",
                Plan(
                    lm.model_id,
                    fp,
                    {n: {"weight": f} for n, f in fmts.items()},
                    metrics={"effective_bits": plan_bits(fmts, members)},
                ),
            )
        )
    for path in [p for d in plans_dirs for p in sorted(Path(d).glob("*.json")) if not p.stem.startswith("returned@")]:
        plan = Plan.load(path)
        plan.metrics.setdefault("effective_bits", plan_bits(plan.weight_formats(), members))
        out.append((f"{path.resolve().parent.parent.name}/{path.stem}", plan))
    return out


def correlations(rows: list[dict]) -> dict:
    """Spearman and Kendall rank correlations of ppl and KL with each accuracy, across plans."""
    out = {}
    for x in ("ppl", "kl"):
        for y in ACCURACIES:
            a, b = [r[x] for r in rows], [r[y] for r in rows]
            ok = len(rows) >= 3 and len(set(a)) > 1 and len(set(b)) > 1
            out[f"{x}~{y}"] = {
                "spearman": float(stats.spearmanr(a, b)[0]) if ok else None,
                "kendall": float(stats.kendalltau(a, b)[0]) if ok else None,
                "plans": len(rows),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--evaluation", default=DEFAULT_EVALUATION)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--formats", default=FORMATS, help="uniform RTN formats, comma-separated ('' for none)")
    ap.add_argument(
        "--plans-dir", action="append", default=[], help="also measure every *.json plan in this folder (repeatable)"
    )
    ap.add_argument("--cloze-items", type=int, default=TaskSettings.cloze_items)
    ap.add_argument("--mc-items", type=int, default=TaskSettings.mc_items)
    ap.add_argument("--items", type=int, default=None, help="both item counts at once (a quick check)")
    ap.add_argument("--context-tokens", type=int, default=TaskSettings.context_tokens)
    ap.add_argument("--choices", type=int, default=TaskSettings.choices)
    ap.add_argument("--seed", type=int, default=TaskSettings.seed)
    ap.add_argument("--plans", type=int, default=None, help="measure at most this many plans (in order) this run")
    ap.add_argument(
        "--out", default=str(RESULTS / "tasks"), help="results path without suffix (default benchmarks/results/tasks)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    settings = TaskSettings(
        cloze_items=a.items or a.cloze_items,
        mc_items=a.items or a.mc_items,
        context_tokens=a.context_tokens,
        choices=a.choices,
        seed=a.seed,
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    lm = load_model(a.model)
    text = load_text(a.evaluation)
    lead = conventions(lm.tokenizer)  # as a search builds its evaluation windows: BOS where the tokenizer adds one
    tokens = token_chunks(lm.tokenizer, text, a.seq_len, a.eval_chunks, lead=lead["evaluation_leading"])
    bos = lead["leading_tokens"] if lead["evaluation_leading"] else []
    tasks = TaskEvaluator(text, lm.tokenizer, settings, bos=bos, progress=False)
    setup = {
        "model": lm.model_id,
        "evaluation": f"{a.evaluation}: {a.eval_chunks} x {a.seq_len} tokens",
        "eval_sha": tokens_hash(tokens),
        "tasks": {"key": tasks.cache_parts[-1], **asdict(settings), "bos": tasks.bos},
    }
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    done = old.get("plans", {}) if old.get("setup") == setup else {}
    if old and not done:
        print("the existing results are for other items or evaluation tokens: measuring every plan again", flush=True)

    members = [m for d in SearchSpace.from_file("llama").build(lm.model) for m in d.members]
    ev = Evaluator(tokens, progress=False)
    todo = [
        (n, p)
        for n, p in plans_to_measure(lm, members, [f for f in a.formats.split(",") if f], a.plans_dir)
        if n not in done
    ]
    for name, plan in todo[: a.plans]:
        t0 = time.perf_counter()
        if not hasattr(ev, "reference_"):
            ev.fit(lm.model)
        if plan is None:
            q, bits, t1 = ev.reference_.to_dict(), 16.0, time.perf_counter()
            r = tasks.score(lm.model, desc=name)
        else:
            with applied(lm.model, plan) as model:
                q, t1 = ev.score(model, desc=name).to_dict(), time.perf_counter()
                r = tasks.score(model, desc=name)
            bits = float(plan.metrics["effective_bits"])
        row = {
            "plan": name,
            "effective_bits": bits,
            "ppl": q["ppl"],
            "kl": q["kl"],
            **r,
            **{f"{k}_ci": wilson_ci(r[k], r["mc_items" if k.startswith("mc") else "cloze_items"]) for k in ACCURACIES},
            "seconds_ppl_kl": t1 - t0,
            "seconds_tasks": time.perf_counter() - t1,
        }
        done[name] = row
        print(
            " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if not k.endswith("_ci")
            ),
            flush=True,
        )
        rows = list(done.values())
        pd.DataFrame(rows)[COLUMNS].to_csv(out.with_suffix(".csv"), index=False)
        write_json_atomic(
            out.with_suffix(".json"),
            {"machine": machine(a.threads), "setup": setup, "plans": done, "correlations": correlations(rows)},
        )
    rows = list(done.values())
    for k, v in correlations(rows).items():
        if v["spearman"] is not None:
            print(f"{k:>18}: Spearman {v['spearman']:+.3f}  Kendall {v['kendall']:+.3f}  ({v['plans']} plans)")


if __name__ == "__main__":
    main()
