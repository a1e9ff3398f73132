"""The formats issue's goal, read off the committed results (no model is run).

    .venv/bin/python benchmarks/goal.py

1. Per model and per llama.cpp preset size below 5.0 bpw (``llamacpp.csv``): the best
   llama.cpp file of at most that size (lowest KL, with or without its imatrix, up to 0.01 bpw over)
   next to mpsearch's returned GGUF-space plan at that size, and the ratio
   mpsearch KL / llama.cpp KL (below 1: mpsearch wins).
2. Per model: the share of the log-perplexity gap between uniform 3-bit and uniform
   4-bit RTN (g64) that the best mpsearch plan at 3.5 bits closes, over the plans the
   searches returned at <= 3.5 effective bits in ``models.csv`` (RTN space) and
   ``gap_3.5.csv`` (the search with clipped RTN and GPTQ, ``benchmarks/gap.py``), if
   present. Only returned plans count: a search picks them on its own refinement slice,
   so the evaluation text never chooses the winner.

   The same share against uniform GPTQ 3-bit and 4-bit, where ``quantizers.py`` measured them.

3. Per model, the README's side-by-side table: every llama.cpp file below 5.0 bpw by
   size, mpsearch's returned plan at that size and its types requantized by llama-quantize.

Writes benchmarks/results/goal.{md,csv}.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS  # noqa: E402


def sizes_table(ll: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, llama.cpp size below 5.0 bpw, mpsearch space)."""
    ll = ll.assign(space=ll.get("space", pd.Series(index=ll.index, dtype=object)).fillna("gguf"))
    rows = []
    for model, m in ll.groupby("model", sort=False):
        lc = m[m.source == "llama.cpp"]
        ms = m[(m.source == "mpsearch") & (m.kind == "returned")]
        if ms.empty:  # a run stopped before its refinement: its MILP plans
            ms = m[(m.source == "mpsearch") & (m.kind == "proxy")]
        for size in sorted({round(b, 4) for b in lc.bpw if b < 5.0}):
            same = lc[lc.bpw <= size + 0.01]  # llama.cpp's best file of at most this size
            best = same.loc[same.kl.idxmin()]
            base = {
                "model": model,
                "size_bpw": size,
                "llama_cpp_best": f"{best['name']}{' +imatrix' if best.imatrix else ''}",
                "llama_cpp_kl": best.kl,
            }
            mine = ms[(ms.budget.astype(float) - size).abs() < 1e-3]
            if mine.empty:
                rows.append(
                    {**base, "space": "", "mpsearch_bpw": None, "mpsearch_kl": None, "ratio": None, "winner": "not run"}
                )
            for r in mine.itertuples():
                ratio = r.kl / best.kl
                rows.append(
                    {
                        **base,
                        "space": r.space,
                        "mpsearch_bpw": r.bpw,
                        "mpsearch_kl": r.kl,
                        "ratio": ratio,
                        "winner": "mpsearch" if ratio < 1 else "llama.cpp",
                    }
                )
    return pd.DataFrame(rows)


def side_by_side(ll: pd.DataFrame, model: str, space: str = "gguf") -> str:
    """The README's table for one model: every llama.cpp file below 5.0 bpw by size, and
    mpsearch's returned plan (and its types requantized by llama-quantize) at that size."""
    ll = ll.assign(space=ll.get("space", pd.Series(index=ll.index, dtype=object)).fillna("gguf"))
    m = ll[ll.model == model]
    lc = m[m.source == "llama.cpp"]
    ms = m[(m.source == "mpsearch") & (m.space == space)]
    lines = [
        "| size (bpw) | llama.cpp, no imatrix (KL) | llama.cpp, imatrix (KL) | mpsearch (KL) | its types via "
        "llama-quantize | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for size in sorted({round(b, 4) for b in lc.bpw if b < 5.0}):
        same = lc[(lc.bpw - size).abs() < 1e-3]
        files = [
            ", ".join(f"{r.name} {r.kl:.3f}" for r in same[same.imatrix == flag].itertuples()) or "-"
            for flag in (False, True)
        ]
        at = ms[(ms.budget.astype(float) - size).abs() < 1e-3]
        ret, req = at[at.kind == "returned"], at[at.kind == "tensor-types"]
        milp_only = ret.empty and not at[at.kind == "proxy"].empty
        if milp_only:  # a run stopped before its refinement: the MILP plan, measured on the evaluation text
            ret = at[at.kind == "proxy"]
        best = lc[lc.bpw <= size + 0.01].kl.min()
        mine = f"**{ret.kl.iloc[0]:.4f}**{' (MILP plan)' if milp_only else ''}" if len(ret) else "not run"
        ratio = f"{ret.kl.iloc[0] / best:.2f}" if len(ret) else ""
        lines.append(
            f"| {size:.4f} | {files[0]} | {files[1]} | {mine} | {f'{req.kl.iloc[0]:.4f}' if len(req) else '-'} | "
            f"{ratio} |"
        )
    return "\n".join(lines)


def gap_table(models: pd.DataFrame, extra: pd.DataFrame | None) -> pd.DataFrame:
    rows = []
    for model, m in models.groupby("model", sort=False):
        u3 = m[(m.kind == "uniform") & (m.budget == "uniform:3")].ppl.iloc[0]
        u4 = m[(m.kind == "uniform") & (m.budget == "uniform:4")].ppl.iloc[0]
        # only plans a search returned (chosen on its own refinement slice), so the
        # evaluation text does not pick the winner
        cols = ["plan", "effective_bits", "ppl", "kl"]
        cands = m[(m.kind == "returned") & (m.effective_bits <= 3.5 + 1e-9)][cols]
        if extra is not None:
            e = extra[(extra.model == model) & (extra.kind == "returned")]
            cands = pd.concat([cands, e.assign(plan=e.plan + " (" + e.space + " space)")[cols]])
        best = cands.loc[cands.ppl.idxmin()]
        share = (math.log(u3) - math.log(best.ppl)) / (math.log(u3) - math.log(u4))
        rows.append(
            {
                "model": model,
                "uniform3_ppl": u3,
                "uniform4_ppl": u4,
                "best_plan": best.plan,
                "best_bits": best.effective_bits,
                "best_ppl": best.ppl,
                "best_kl": best.kl,
                "gap_closed": share,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    ll = pd.read_csv(RESULTS / "llamacpp.csv")
    models = pd.read_csv(RESULTS / "models.csv")
    extra_path = RESULTS / "gap_3.5.csv"
    extra = pd.read_csv(extra_path) if extra_path.exists() else None
    sizes, gap = sizes_table(ll), gap_table(models, extra)
    md = [
        "| model | size (bpw) | llama.cpp's best file | its KL | mpsearch space | mpsearch bpw | mpsearch KL | ratio | "
        "winner |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sizes.itertuples():
        f = lambda v, p: "" if v is None or pd.isna(v) else f"{v:.{p}f}"  # noqa: E731
        md.append(
            f"| {r.model} | {r.size_bpw:.4f} | {r.llama_cpp_best} | {r.llama_cpp_kl:.4f} | {r.space} | "
            f"{f(r.mpsearch_bpw, 4)} | "
            f"{f(r.mpsearch_kl, 4)} | {f(r.ratio, 2)} | {r.winner} |"
        )
    md += [
        "",
        "| model | uniform 3-bit ppl | uniform 4-bit ppl | best plan at <= 3.5 bits | bits | ppl | KL | log-ppl gap "
        "closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r.model} | {r.uniform3_ppl:.2f} | {r.uniform4_ppl:.2f} | {r.best_plan} | {r.best_bits:.3f} | "
        f"{r.best_ppl:.2f} | "
        f"{r.best_kl:.4f} | {r.gap_closed:.0%} |"
        for r in gap.itertuples()
    ]
    # the same share against uniform GPTQ, the strongest uniform quantizer (quantizers.py)
    for model, r in gap.set_index("model").iterrows():
        path = RESULTS / ("quantizers.csv" if model == "smollm2" else f"quantizers_{model}.csv")
        q = pd.read_csv(path) if path.exists() else None
        if q is None or not {3, 4} <= set(
            q[q.quantizer.str.endswith("(default)") & q.quantizer.str.startswith("GPTQ")].bits
        ):
            md += ["", f"{model}: uniform GPTQ at 3 and 4 bits not measured (benchmarks/quantizers.py --model {model})"]
            continue
        g = q[q.quantizer.str.endswith("(default)") & q.quantizer.str.startswith("GPTQ")].set_index("bits").ppl
        share = (math.log(g[3]) - math.log(r.best_ppl)) / (math.log(g[3]) - math.log(g[4]))
        md += [
            "",
            f"{model}: against uniform GPTQ (3-bit ppl {g[3]:.2f}, 4-bit {g[4]:.2f}) the same plan closes "
            f"{share:.0%} of the log-ppl gap",
        ]
    for model in ll.model.unique():
        md += ["", f"{model}:", "", side_by_side(ll, model)]
    (RESULTS / "goal.md").write_text("\n".join(md) + "\n")
    pd.concat([sizes.assign(table="sizes"), gap.assign(table="gap")]).to_csv(RESULTS / "goal.csv", index=False)
    print("\n".join(md))


if __name__ == "__main__":
    main()
