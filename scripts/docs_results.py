"""Write the benchmark pages of the docs from the committed results.

    .venv/bin/python scripts/docs_results.py           # (re)write docs/results/
    .venv/bin/python scripts/docs_results.py --check   # exit 1, naming each stale page

Reads ``benchmarks/results/*.csv`` (and the ``costs_demo/`` and ``profile_device/`` folders),
some of the Markdown files the benchmarks write beside them, and their PNG figures. Writes
``docs/results/<page>.md``, one page per results file or group of related files, and
``docs/results/index.md``; the figures are copied into ``docs/results/``. The site's front
page, ``docs/index.md``, is the README with its ``docs/`` links made relative. Nothing here is
typed by hand except each page's title and the sentence or two that say what was measured
and by which command. A CSV that no group below names still gets a page of its own.

The output depends only on the files read, so it is the same on every machine: ``--check``
compares it with what is on disk, and ``tests/test_docs.py`` runs it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "results"
MKDOCS = ROOT / "mkdocs.yml"

MAX_ROWS = 300  # a longer CSV shows its first MAX_ROWS rows and says where the whole file is
DIGITS = 4  # significant digits of a float


@dataclass
class Group:
    """One page: the results files it shows and what produced them."""

    name: str
    title: str
    source: str  # the command that writes the files
    about: str  # one or two sentences: what was measured
    csvs: list[str]  # paths under benchmarks/results
    mds: list[str] = field(default_factory=list)  # the benchmark's own Markdown, embedded
    pngs: list[str] = field(default_factory=list)  # figures, copied beside the page
    origin: bool = False  # figures on SmolLM2 or Gemma, whose weights lie on a GGUF grid


ORIGIN = (
    "SmolLM2-135M's weights are dequantized Q4_1 and Gemma-3-270M's dequantized Q4_K_M, so a format "
    "that reproduces a tensor's origin type (on SmolLM2 `u4g32a` or `q4_1`) is lossless there."
)


def script(name: str) -> str:
    return f"`benchmarks/{name}.py`"


GROUPS = [
    Group(
        "foundation",
        "Foundation search: three proxies against uniform and the recipe",
        script("foundation"),
        "Perplexity and KL on 16 x 512 held-out tokens of Persuasion for uniform 3- and 4-bit RTN, the "
        "llama.cpp-style recipe (at its own sizes and squeezed into the uniform ones) and the MILP plans of "
        "the mse, fisher and input_moment proxies, calibrated on Pride and Prejudice; on SmolLM2-135M and, "
        "with `--model gemma3-270m`, on Gemma-3-270M.",
        ["foundation.csv", "foundation_gemma3-270m.csv"],
        mds=["foundation.md", "foundation_gemma3-270m.md"],
        origin=True,
    ),
    Group(
        "proxies",
        "Every built-in proxy, and what each primitive costs",
        script("proxies"),
        "Each built-in proxy's exact MILP plan at the effective bits of uniform 3-bit and 4-bit (3.5 and "
        "4.5), measured on Persuasion next to uniform and the recipe; and the wall time and peak memory of "
        "each primitive family, each computed afresh in its own process.",
        ["proxies.csv", "proxies_gemma3-270m.csv", "proxies_primitives.csv", "proxies_primitives_gemma3-270m.csv"],
        mds=["proxies.md", "proxies_gemma3-270m.md"],
        origin=True,
    ),
    Group(
        "measured_kl",
        "The measured-KL proxy on the default model",
        "`mpsearch search --proxy measured_kl --budget uniform:3 --budget uniform:4`",
        "The MILP plans of the measured per-tensor KL (`predicted_measured_kl` is the sum of the per-tensor "
        "KLs) next to uniform and the recipe on SmolLM2-135M, and the time and memory of each stage.",
        ["measured_kl_results.csv", "measured_kl_stages.csv"],
        origin=True,
    ),
    Group(
        "user_objects",
        "Your own conv net as an object: time and memory by batch size",
        script("user_objects"),
        "A MobileNet-style net of 4.2M weights with depthwise convolutions, passed as an object with "
        "`BatchData` of random 3 x 224 x 224 images, searched with the Fisher proxy at uniform 4 bits per output "
        "channel, on an empty cache, one process per batch size. The peak is one batch's forward and backward "
        "pass in the gradient primitive, so it grows with the batch size.",
        ["user_objects.csv"],
    ),
    Group(
        "models",
        "Two models: the search against its baselines",
        script("models"),
        "A search with the Fisher proxy and the measured refinement at 3.5 and 4.5 effective bits on "
        "SmolLM2-135M and Gemma-3-270M; every plan it measured, with `kind = returned` for the plan it "
        "returns.",
        ["models.csv"],
        origin=True,
    ),
    Group(
        "gemma_bos",
        "Gemma-3-270M with and without BOS in its windows",
        script("gemma_bos"),
        "The Fisher MILP plan (no refinement) against uniform and the recipe on Gemma-3-270M under the four "
        "combinations of BOS in the calibration and evaluation windows, and how the Fisher mass spreads "
        "over tensor kinds and layers. This benchmark writes no CSV: the page embeds its Markdown.",
        [],
        mds=["gemma_bos.md"],
    ),
    Group(
        "quantizers",
        "Every quantizer side by side",
        script("quantizers"),
        "One format on every block linear (2, 3 and 4 bits, groups of 64 where the format has groups), "
        "perplexity and KL on 16 x 512 tokens of Persuasion; imatrix from 8 x 512 calibration tokens, GPTQ's "
        "Gram matrix from 64 x 512.",
        ["quantizers.csv", "quantizers_gemma3-270m.csv"],
        origin=True,
    ),
    Group(
        "gptq_calibration",
        "GPTQ's calibration tokens",
        script("gptq_calibration"),
        "For a few layers of SmolLM2-135M, the output error on held-out text of RTN, clipped RTN and GPTQ "
        "with the Gram matrix fitted on 8 to 128 windows of 512 calibration tokens (`vs_rtn`: the error "
        "over RTN's).",
        ["gptq_calibration.csv"],
    ),
    Group(
        "llamacpp",
        "llama.cpp's own files at equal size",
        script("llamacpp"),
        "llama-quantize's presets, with and without llama-imatrix's importance matrix, scored by mpsearch's "
        "evaluator (KL to the all-F32 reference on 16 x 512 tokens of Persuasion), next to mpsearch's "
        "GGUF-space plans at the same bits per weight.",
        ["llamacpp.csv"],
        origin=True,
    ),
    Group(
        "ggml_vs_llamacpp",
        "mpsearch's GGUF quantization against llama-quantize's",
        script("ggml_vs_llamacpp"),
        "For each GGML type, the imatrix-weighted squared error of the tensors llama-quantize gave that "
        "type, quantized from the same F32 weights with the same imatrix by llama.cpp and by mpsearch "
        "(`ratio`: mpsearch over llama.cpp).",
        ["ggml_vs_llamacpp.csv"],
        origin=True,
    ),
    Group(
        "gap",
        "The 3.5-bit search with clipped RTN and GPTQ",
        script("gap"),
        "The search at 3.5 effective bits in `search_spaces/gap.toml` (RTN, clipped RTN and GPTQ at 2-8 "
        "bits, groups of 64) with the gram_loss and fisher proxies, on both models.",
        ["gap_3.5.csv"],
        origin=True,
    ),
    Group(
        "goal",
        "The formats goal: llama.cpp at equal size, and the 3.5-bit gap",
        script("goal"),
        "Read off `llamacpp.csv`, `models.csv` and `gap_3.5.csv` (no model is run): mpsearch's returned "
        "GGUF plan against llama.cpp's best file of at most its size, and the share of the log-perplexity "
        "gap between uniform 3-bit and 4-bit RTN that the best 3.5-bit plan closes.",
        ["goal.csv"],
        mds=["goal.md"],
        origin=True,
    ),
    Group(
        "exports",
        "Exports read back by their packages",
        script("exports"),
        "The quick start's Fisher MILP plan exported to each quantizer-config target and read back, module "
        "by module, by the target package's own code on SmolLM2-135M's 210 block linears.",
        ["exports.csv"],
    ),
    Group(
        "kv",
        "The KV cache: KVQuant against naive per-token",
        script("kv"),
        "Every K and V cache of SmolLM2-135M at 16, 8, 4, 3 and 2 bits per element (weights untouched), "
        "measured on the inference path: 2048-token Persuasion windows prefilled through the cache, the "
        "last 128 tokens decoded one at a time.",
        ["kv.csv"],
    ),
    Group(
        "activations",
        "Layer inputs: W8A8 and W4A8 with and without CrossQuant",
        script("activations"),
        "Every decision linear of SmolLM2-135M with W8 (per channel) or W4 (groups of 64) weights and one "
        "input format (per-tensor static, per-token, CrossQuant), on 8 x 512 Persuasion tokens; the "
        "quantization kernel is the share of nonzero inputs that round to zero, per layer in "
        "`activations_kernel.csv`.",
        ["activations.csv", "activations_kernel.csv"],
        origin=True,
    ),
    Group(
        "joint",
        "Weights and KV cache: joint against separate allocation",
        script("joint"),
        "One memory budget (weights plus the KV cache at 2k or 8k tokens) spent by one MILP over both "
        "(`joint`) or split in proportion to their fp16 bytes (`separate`); `dkl_best` is KL minus the "
        "better plan's, with a paired bootstrap CI.",
        ["joint.csv"],
        origin=True,
    ),
    Group(
        "allocators",
        "Allocator speed and predicted loss",
        script("allocators"),
        "Median wall time of each allocator and of the whole Pareto front, and the predicted loss relative "
        "to the exact MILP, on SmolLM2-135M's Fisher table and a synthetic 10,000 x 8 instance.",
        ["allocators.csv"],
    ),
    Group(
        "solvers_vs_cbc",
        "The MILP against PuLP/CBC",
        script("solvers_vs_cbc"),
        "HAWQ-V3's published ILPs (ResNet-18 and ResNet-50 under size, BOPs and latency limits) and "
        "synthetic instances, solved by mpsearch's MILP and by PuLP/CBC, timed from arrays to plan.",
        ["solvers_vs_cbc.csv"],
    ),
    Group(
        "pareto",
        "Measured Pareto fronts of every method",
        script("pareto"),
        "Uniform, the recipe, the greedy, BAQ and MILP allocators on the Fisher proxy, NSGA-II on measured KL "
        "and APQ's predictor, every plan measured on 4,096 tokens of Persuasion.",
        ["pareto.csv"],
        pngs=["pareto.png", "pareto_heatmap_milp_3.5bits.png"],
        origin=True,
    ),
    Group(
        "costs_demo",
        "A search under energy and measured-latency limits",
        '`mpsearch search --budget 4.5 --constraint "measured_decode<=35ms" --constraint "energy<=20.5mJ"`',
        "Every plan of the one-command cost example on SmolLM2-135M with every cost and the task accuracy "
        "(`results.csv`), the same search without limits and without measuring "
        "(`results_unconstrained_no_measure.csv`), each plan's costs split by tensor kind (`costs.csv`) and "
        "the stage times (`stages.csv`). Files in `benchmarks/results/costs_demo/`.",
        [
            "costs_demo/results.csv",
            "costs_demo/results_unconstrained_no_measure.csv",
            "costs_demo/costs.csv",
            "costs_demo/stages.csv",
        ],
        origin=True,
    ),
    Group(
        "latency",
        "Predicted against measured decode time",
        script("latency"),
        "Each plan deployed through real kernels decodes 32 tokens after a 512-token prompt (median step); "
        "the prediction is the kernel table measured in the same run (`latency_validation.csv`) or the "
        "roofline on this machine's peaks (`latency_validation_roofline.csv`).",
        ["latency_validation.csv", "latency_validation_roofline.csv"],
        origin=True,
    ),
    Group(
        "profile_device",
        "This machine's kernel table",
        "`mpsearch profile-device`",
        "The time of every kernel on every layer shape and format of the default space, for one decode "
        "token and for a 512-token prompt. Files in `benchmarks/results/profile_device/`.",
        ["profile_device/kernels.csv"],
    ),
    Group(
        "hawq_latency",
        "HAWQ-V3's T4 latency tables",
        script("hawq_latency"),
        "HAWQ-V3's latency-constrained allocations for ResNet-18 and ResNet-50 from its published T4 "
        "tables, solved by mpsearch's MILP and by PuLP/CBC, and what the T4 roofline would have chosen.",
        ["hawq_latency.csv"],
    ),
    Group(
        "tasks",
        "Task accuracy next to perplexity and KL",
        script("tasks"),
        "13 plans on SmolLM2-135M, each measured on 16 x 512 Persuasion tokens and on 200 cloze and 100 "
        "multiple-choice items built from the same text.",
        ["tasks.csv"],
        origin=True,
    ),
    Group(
        "ground_truth",
        "Ground truths for the proxy leaderboard",
        script("ground_truth"),
        "Plans sampled over effective bits and distance from proxy optima, each measured: 300 on "
        "SmolLM2-135M (KL and perplexity on 8 x 256 Persuasion tokens) and 1,000 on the Fashion-MNIST CNN "
        "(accuracy, loss and KL on the 10,000 test images); `*_single.csv` holds the KL of every "
        "(tensor, format) quantized alone.",
        ["ground_truth_lm.csv", "ground_truth_lm_single.csv", "ground_truth_cnn.csv", "ground_truth_cnn_single.csv"],
        origin=True,
    ),
    Group(
        "leaderboard",
        "Proxy leaderboards",
        "`mpsearch leaderboard GROUND_TRUTH.csv --budget 3 --budget 4 --out PREFIX`",
        "Every proxy's plan predictions against the measured KL of the held-out ground-truth plans: "
        "Spearman, Kendall, rho_s@k and Spearman within bits bins with bootstrap 95% CIs, and each proxy's "
        "MILP plan measured at 3 and 4 bits.",
        ["leaderboard_lm.csv", "leaderboard_cnn.csv"],
        mds=["leaderboard_lm.md", "leaderboard_cnn.md"],
        pngs=["leaderboard_lm.png", "leaderboard_cnn.png"],
        origin=True,
    ),
    Group(
        "workers",
        "Worker throughput",
        script("workers"),
        "Plans measured per minute by 1 and 2 `mpsearch worker` processes on a journal file and on "
        "PostgreSQL, and the per-trial overhead when measuring costs nothing. Small, noisy runs.",
        ["workers.csv"],
    ),
    Group(
        "hostile",
        "Hostile input on the default model",
        script("hostile"),
        "Each case runs `mpsearch` through the real command line and checks the exit status, the one-line "
        "error and that nothing is written outside its outputs (`held`: the case behaved as it must).",
        ["hostile.csv"],
    ),
]


# -- formatting ---------------------------------------------------------------------------------


def fmt_cell(text: str) -> str:
    """A CSV cell as a table cell: floats to DIGITS significant digits, integers as they are."""
    s = text.strip()
    if not s:
        return ""
    try:
        int(s)
        return s
    except ValueError:
        pass
    try:
        x = float(s)
    except ValueError:
        return escape(s)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if 1e4 <= abs(x) < 1e15:
        return f"{x:.0f}"  # 177337, not 1.773e+05
    return f"{x:.{DIGITS}g}"


def escape(text: str) -> str:
    """Text as it reads, not as Markdown or HTML: a pipe, a star or a tag in a cell stays text."""
    for ch, rep in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(ch, rep)
    for ch in "\\`*_[]|":
        text = text.replace(ch, "\\" + ch)
    return " ".join(text.split())


def is_long_list(text: str) -> bool:
    s = text.strip()
    return len(s) > 60 and s[:1] in "[{"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; numbers right-aligned."""
    numeric = []
    for i in range(len(header)):
        cells = [r[i] for r in rows if i < len(r) and r[i].strip()]
        ok = bool(cells)
        for c in cells:
            try:
                float(c)
            except ValueError:
                ok = False
                break
        numeric.append(ok)
    lines = ["| " + " | ".join(escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for r in rows:
        cells = [fmt_cell(r[i]) if i < len(r) else "" for i in range(len(header))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_section(rel: str) -> str:
    path = RESULTS / rel
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], [r for r in rows[1:] if any(c.strip() for c in r)]
    keep = [i for i, _ in enumerate(header) if not any(i < len(r) and is_long_list(r[i]) for r in body)]
    dropped = [header[i] for i in range(len(header)) if i not in keep]
    shown = body[:MAX_ROWS]
    out = [f"## `{rel}`", ""]
    notes = []
    if len(body) > MAX_ROWS:
        notes.append(f"First {MAX_ROWS} of {len(body)} rows; the whole file is `benchmarks/results/{rel}`.")
    if dropped:
        notes.append("Left out here (lists per plan): " + ", ".join(f"`{d}`" for d in dropped) + ".")
    if notes:
        out += [" ".join(notes), ""]
    out.append(md_table([header[i] for i in keep], [[r[i] if i < len(r) else "" for i in keep] for r in shown]))
    return "\n".join(out)


def md_section(rel: str) -> str:
    """The benchmark's own Markdown, its headings moved below the page's."""
    text = (RESULTS / rel).read_text(encoding="utf-8")
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            line = "##" + line
        lines.append(line.rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join([f"## As the benchmark wrote it: `{rel}`", ""] + lines)


def page(g: Group) -> str:
    parts = [
        f"# {g.title}",
        "",
        "<!-- Written by scripts/docs_results.py from benchmarks/results/; do not edit by hand. -->",
        "",
        g.about,
        "",
        f"Produced by {g.source}.",
    ]
    if g.origin:
        parts += ["", ORIGIN]
    for png in g.pngs:
        parts += ["", f"![{png}]({png})"]
    for rel in g.mds:
        parts += ["", md_section(rel)]
    for rel in g.csvs:
        parts += ["", csv_section(rel)]
    return "\n".join(parts) + "\n"


def index(groups: list[Group]) -> str:
    parts = [
        "# Benchmark results",
        "",
        "<!-- Written by scripts/docs_results.py from benchmarks/results/; do not edit by hand. -->",
        "",
        "Every table on these pages is rendered from a file in `benchmarks/results/` by "
        "`scripts/docs_results.py`; rerun it after a benchmark. The prose pages link here for their figures.",
        "",
        "| page | produced by | files |",
        "|---|---|---|",
    ]
    for g in groups:
        files = ", ".join(f"`{f}`" for f in g.csvs + g.mds)
        source = g.source.replace("|", "\\|")
        parts.append(f"| [{g.title}]({g.name}.md) | {source} | {files} |")
    return "\n".join(parts) + "\n"


# -- what to write ------------------------------------------------------------------------------


def all_groups() -> list[Group]:
    """The groups above, plus a page of its own for any CSV none of them names."""
    named = {f for g in GROUPS for f in g.csvs}
    extra = []
    for path in sorted(RESULTS.glob("*.csv")):
        if path.name in named:
            continue
        stem = path.stem
        bench = ROOT / "benchmarks" / f"{stem}.py"
        source = script(stem) if bench.exists() else "a benchmark not named in `scripts/docs_results.py`"
        extra.append(Group(stem, f"`{path.name}`", source, "No description yet.", [path.name]))
    return GROUPS + extra


def front_page() -> bytes:
    """docs/index.md: the README, its ``docs/`` links made relative to the site."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    note = "<!-- Written by scripts/docs_results.py from README.md; edit the README. -->\n\n"
    title, _, rest = readme.partition("\n")
    return f"{title}\n\n{note}{rest.lstrip()}".replace("](docs/", "](").encode()


def render() -> dict[str, bytes]:
    """Every file under docs/results/ by name, as it should be."""
    groups = all_groups()
    files: dict[str, bytes] = {"index.md": index(groups).encode()}
    for g in groups:
        files[f"{g.name}.md"] = page(g).encode()
        for png in g.pngs:
            files[png] = (RESULTS / png).read_bytes()
    return files


def nav_missing(files: dict[str, bytes]) -> list[str]:
    """Pages that mkdocs.yml's nav does not list."""
    nav = MKDOCS.read_text(encoding="utf-8") if MKDOCS.exists() else ""
    return [name for name in sorted(files) if name.endswith(".md") and f"results/{name}" not in nav]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs from what would be written")
    args = parser.parse_args(argv)
    index_page, front = ROOT / "docs" / "index.md", front_page()
    if args.check and (not index_page.exists() or index_page.read_bytes() != front):
        print("stale: docs/index.md (the README's copy)", file=sys.stderr)
        print("run: .venv/bin/python scripts/docs_results.py", file=sys.stderr)
        return 1
    if not args.check and (not index_page.exists() or index_page.read_bytes() != front):
        index_page.write_bytes(front)
        print("wrote docs/index.md")
    files = render()
    on_disk = {p.name for p in OUT.glob("*") if p.is_file()} if OUT.exists() else set()
    stale = [n for n in sorted(files) if n not in on_disk or (OUT / n).read_bytes() != files[n]]
    extra = sorted(on_disk - set(files))
    if args.check:
        for n in stale:
            print(f"stale: docs/results/{n}", file=sys.stderr)
        for n in extra:
            print(f"not written by this script: docs/results/{n}", file=sys.stderr)
        for n in nav_missing(files):
            print(f"mkdocs.yml's nav does not list results/{n}", file=sys.stderr)
        if stale or extra or nav_missing(files):
            print("run: .venv/bin/python scripts/docs_results.py", file=sys.stderr)
            return 1
        print(f"docs/results/: {len(files)} files current")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for n in stale:
        (OUT / n).write_bytes(files[n])
        print(f"wrote docs/results/{n}")
    for n in extra:
        if n.endswith((".md", ".png")):
            (OUT / n).unlink()
            print(f"removed docs/results/{n}")
    for n in nav_missing(files):
        print(f"add results/{n} to mkdocs.yml's nav", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
