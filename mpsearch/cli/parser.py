"""The ``mpsearch`` command line: every command's flags, their defaults and their help."""

from __future__ import annotations

import argparse

from ..models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION


def _export_targets() -> str:
    from ..core import registry

    return "; ".join(f"{n} ({registry.get('exporter', n).about})" for n in registry.names("exporter"))


def device_arg(sp: argparse.ArgumentParser) -> None:
    """``--device`` for a command that runs a model; the choices are checked by
    :func:`mpsearch.core.device.resolve_device`, whose messages say what to use instead."""
    sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpsearch", description="Mixed-precision quantization search.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            default="smollm2",
            help="smollm2 (embedded, default), gemma3-270m (setup.sh --gemma), "
            "fashion-cnn (the Fashion-MNIST residual CNN, with --space cnn), a .gguf file, a local model folder, or a "
            "Hugging Face id",
        )
        sp.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
        device_arg(sp)
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def eval_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--eval-chunks", type=int, default=16, help="held-out sequences to measure on (default 16)")
        sp.add_argument("--eval-seq-len", type=int, default=512, help="tokens per held-out sequence (default 512)")

    def scope_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--space",
            default="llama",
            help="search space whose decision tensors the plan's patterns and _default reach (default llama)",
        )
        sp.add_argument(
            "--all-tensors",
            action="store_true",
            help="let patterns and _default reach every 2-D weight, embeddings and LM head included",
        )

    def search_args(sp: argparse.ArgumentParser, out: str) -> None:
        common(sp)
        sp.add_argument(
            "--calibration", default=DEFAULT_CALIBRATION, help=f"calibration text (default {DEFAULT_CALIBRATION})"
        )
        sp.add_argument(
            "--evaluation", default=DEFAULT_EVALUATION, help=f"held-out text (default {DEFAULT_EVALUATION})"
        )
        sp.add_argument("--space", default="llama", help="search-space file or built-in name (default llama)")
        sp.add_argument(
            "--proxy", action="append", default=None, help="proxy name or file; repeat for several (default fisher)"
        )
        sp.add_argument(
            "--budget",
            action="append",
            default=None,
            help="bits/weight (3.5), size (48MB), uniform:BITS[:GROUP], uniform:FORMAT (uniform:q4_k) or recipe:BITS; "
            "repeatable (default uniform:3)",
        )
        sp.add_argument(
            "--pin",
            action="append",
            default=[],
            metavar="NAME=BITS[:GROUP]",
            help="pin tensors (exact or re:) to a format: bits[:group] on a grid space, a key (q8_0) on a listed one",
        )
        sp.add_argument(
            "--min-bits",
            dest="min_bits",
            action="append",
            default=[],
            metavar="NAME=B",
            help="at least B bits for tensors NAME (exact or re:); repeatable",
        )
        sp.add_argument(
            "--max-bits",
            dest="max_bits",
            action="append",
            default=[],
            metavar="NAME=B",
            help="at most B bits for tensors NAME (exact or re:); repeatable",
        )
        sp.add_argument(
            "--exclude",
            action="append",
            default=[],
            metavar="NAME",
            help="keep tensors unquantized, outside the budget",
        )
        sp.add_argument("--calib-chunks", type=int, default=8, help="calibration sequences (default 8)")
        sp.add_argument(
            "--gram-chunks",
            type=int,
            default=64,
            help="calibration sequences for GPTQ's Gram matrix, the calibration sequences first (default 64)",
        )
        sp.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
        sp.add_argument(
            "--hessian-probes", type=int, default=2, help="Hutchinson probes per calibration sequence (default 2)"
        )
        sp.add_argument(
            "--hessian-sequences", type=int, default=0, help="calibration sequences for the Hessian (default 0 = all)"
        )
        eval_args(sp)
        sp.add_argument(
            "--bos",
            default="auto",
            choices=["auto", "none", "calibration", "evaluation"],
            help="which windows start with the tokenizer's BOS (default auto: all, where the tokenizer adds one); "
            "the others are for diagnosis",
        )
        sp.add_argument("--no-cache", action="store_true", help="recompute primitives and evaluations")
        sp.add_argument(
            "--checkpoint-every",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="save a long primitive pass's state this often, so a killed search resumes there (default 30)",
        )
        sp.add_argument(
            "--no-imatrix",
            action="store_true",
            help="quantize GGUF types without the calibration importance vector (llama.cpp without --imatrix)",
        )
        sp.add_argument(
            "--memo-mb",
            type=int,
            default=1024,
            help="memory for slow quantizations (GPTQ, IQ3_S, GGUF searches) reused across measured plans (default "
            "1024)",
        )
        sp.add_argument("--seed", type=int, default=0, help="random seed of probes and samplers (default 0)")
        sp.add_argument("--out", default=out, help=f"output folder (default {out})")

    s = sub.add_parser("search", help="find plans for one or more budgets and measure them")
    search_args(s, "runs/latest")
    s.add_argument(
        "--solver",
        default="milp",
        help="allocator: milp (default), baq, greedy, lagrangian, brute (see `mpsearch list`)",
    )
    s.add_argument("--no-baselines", action="store_true", help="skip the uniform and recipe baselines")
    s.add_argument("--no-measure", action="store_true", help="solve only; do not measure perplexity/KL")
    s.add_argument(
        "--refine",
        type=int,
        default=16,
        help="measured refinement: plans measured per proxy and budget on a calibration "
        "slice; the search returns the best measured plan, baselines included (default 16; 0 = off)",
    )
    s.add_argument("--refine-chunks", type=int, default=4, help="sequences of the refinement slice (default 4)")
    s.add_argument("--refine-seq-len", type=int, default=256, help="tokens per refinement sequence (default 256)")
    joint = s.add_argument_group("activations and KV cache (spaces with [input] / [kv_cache], e.g. llama_wakv)")
    joint.add_argument(
        "--context",
        type=int,
        default=0,
        help="tokens the KV cache holds for a memory budget (weights + KV), "
        "and the length of each evaluation window decoded through the cache",
    )
    joint.add_argument("--batch", type=int, default=1, help="sequences the KV cache holds at once (default 1)")
    joint.add_argument(
        "--decode", type=int, default=128, help="tokens decoded one at a time at the end of each window (default 128)"
    )
    joint.add_argument(
        "--runtime-proxy",
        default="auto",
        help="proxy of the inputs and KV cache: kl (measured), fisher, mse, or a file; "
        "auto (default): the one in the units of the first --proxy (measured_kl -> kl, fisher -> fisher)",
    )
    joint.add_argument(
        "--act-bits",
        type=float,
        default=0.0,
        help="at most this MAC-weighted mean of activation bits (default: no bound)",
    )
    joint.add_argument(
        "--input-min-bits", type=int, default=0, help="every layer input gets at least this many bits (e.g. 8)"
    )
    joint.add_argument(
        "--allocation",
        action="append",
        choices=["joint", "separate"],
        default=None,
        help="joint: one problem over everything; separate: weights and KV each get their fp16 share of the budget "
        "(default both)",
    )
    costs = s.add_argument_group("costs (every plan's row carries every cost; see `mpsearch list`)")
    costs.add_argument(
        "--constraint",
        action="append",
        default=None,
        metavar="COST<=LIMIT",
        help="a limit beside --budget, e.g. latency_decode<=12ms, measured_decode<=80ms, energy<=25mJ, bops<=10G; "
        "repeatable",
    )
    costs.add_argument(
        "--hardware",
        default="local",
        help="profile the roofline latencies use: local (this machine, measured once), "
        "h100-sxm, t4, jetson-agx-orin, or a TOML file (default local)",
    )
    costs.add_argument("--energy-table", default="horowitz-45nm", help="energy per operation (default horowitz-45nm)")
    costs.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill latencies (default 512)")
    costs.add_argument(
        "--no-profile", action="store_true", help="do not time this machine's kernels (no measured_* costs)"
    )
    s.add_argument(
        "--no-tasks", action="store_true", help="skip the cloze and multiple-choice accuracy of each measured plan"
    )
    s.add_argument(
        "--task-items",
        type=int,
        default=100,
        help="cloze items from the evaluation text (multiple choice: half as many; default 100)",
    )

    pd_ = sub.add_parser(
        "profile-device",
        help="time every layer shape and format of a space with real kernels on this machine "
        "(the measured_* costs), and measure its peak throughput and bandwidth (--hardware local)",
    )
    common(pd_)
    pd_.add_argument("--space", default="llama", help="search space whose shapes and formats to time (default llama)")
    pd_.add_argument("--batch", type=int, default=1, help="sequences per decode step (default 1)")
    pd_.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    pd_.add_argument(
        "--context", type=int, default=512, help="tokens in the KV cache at the timed decode steps (default 512)"
    )
    pd_.add_argument(
        "--no-cache",
        action="store_true",
        help="measure again and replace this machine's cached table (e.g. timed while the machine was busy)",
    )
    pd_.add_argument(
        "--out",
        default=None,
        help="folder to copy the table (kernels.csv, fixed.json) and the profile (hardware.toml) to",
    )

    rp = sub.add_parser("report", help="(re)write a search folder's report.html")
    rp.add_argument("run", help="a search's output folder (holding results.csv)")

    e = sub.add_parser(
        "evolve", help="NSGA-II on measured quality, seeded with the proxy's Pareto plans; rerun to resume"
    )
    search_args(e, "runs/evolve")
    e.add_argument(
        "--trials", type=int, default=48, help="total trials of the study, earlier runs included (default 48)"
    )
    e.add_argument("--population", type=int, default=16, help="NSGA-II population size (default 16)")
    e.add_argument(
        "--objective", default="kl", choices=["kl", "ppl", "nll"], help="measured quality to minimise (default kl)"
    )
    e.add_argument(
        "--study-name",
        default="mpsearch",
        help="Optuna study name inside the journal (default mpsearch); "
        "give each proxy its own name to keep several studies in one --out",
    )
    e.add_argument(
        "--window",
        default=None,
        metavar="LOW:HIGH",
        help="effective-bits range to search (default: the budgets +- 0.25)",
    )
    e.add_argument(
        "--storage",
        default=None,
        help="where the study lives: a journal file (default OUT/study.log) or a database URL "
        "(postgresql+psycopg2://user@host/db) that workers on other machines can reach",
    )
    e.add_argument(
        "--no-work",
        action="store_true",
        help="create the study and enqueue the seed plans, measure nothing (workers do)",
    )
    e.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        help="seconds between a running trial's heartbeats; "
        "a trial silent for 3 of them is failed and retried (default 10)",
    )

    w = sub.add_parser(
        "worker",
        help="join a study made by `mpsearch evolve --storage` and measure its trials until its budget is spent",
    )
    w.add_argument("--study", default="mpsearch", help="study name (evolve's --study-name; default mpsearch)")
    w.add_argument("--storage", required=True, help="the study's journal file or database URL")
    w.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    w.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the study's setting)")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    w.add_argument("--no-cache", action="store_true", help="recompute primitives and evaluations")
    w.add_argument("--heartbeat", type=int, default=10, help="seconds between heartbeats (default 10)")
    w.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampler seed (default: drawn per worker, so workers propose different plans)",
    )
    w.add_argument("--out", default=None, help="also write the study's trials.csv, front.csv and plans here")

    ap = sub.add_parser(
        "apply", help="apply a saved plan and write a loadable model folder with the fake-quantized weights"
    )
    common(ap)
    scope_args(ap)
    ap.add_argument("plan", help="plan JSON file")
    ap.add_argument(
        "--out", required=True, help="model folder to write (config, tokenizer, model.safetensors); --model takes it"
    )

    ev = sub.add_parser("eval", help="measure a saved plan: perplexity and KL to the reference")
    common(ev)
    scope_args(ev)
    ev.add_argument("plan", help="plan JSON file")
    ev.add_argument("--evaluation", default=DEFAULT_EVALUATION, help=f"held-out text (default {DEFAULT_EVALUATION})")
    eval_args(ev)
    ev.add_argument(
        "--context",
        type=int,
        default=0,
        help="measure on the decode path: windows of this many tokens, the last "
        "--decode tokens fed one at a time through the (quantized) KV cache (default 0: full-sequence windows)",
    )
    ev.add_argument(
        "--decode",
        type=int,
        default=128,
        help="tokens decoded through the cache per window with --context (default 128)",
    )

    ex = sub.add_parser(
        "export", help="write a saved plan for another tool: a GGUF file, llama-quantize's tensor-type file"
    )
    common(ex)
    ex.add_argument("plan", help="plan JSON file")
    ex.add_argument("--to", required=True, help=f"target: {_export_targets()}")
    ex.add_argument("--out", required=True, help="file to write")
    ex.add_argument(
        "--nearest",
        action="store_true",
        help="map formats the target cannot express to the nearest one it can, "
        "reporting every change (integer-config targets); without it such a plan is refused, naming the tensor",
    )
    ex.add_argument(
        "--weights-only",
        action="store_true",
        help="drop the plan's activation / KV formats the target cannot carry "
        "(each logged); without it such a plan is refused, naming the tensor",
    )
    ex.add_argument(
        "--full-type",
        default="f16",
        choices=["f16", "f32"],
        help="GGUF type of unquantized (fp16) entries (default f16)",
    )

    hm = sub.add_parser("heatmap", help="draw a plan's per-layer bit map (PNG)")
    hm.add_argument("plan", help="plan JSON file")
    hm.add_argument("--out", required=True, help="PNG file to write")
    hm.add_argument("--model", default=None, help="load this model to show effective bits (scales and zeros included)")

    lb = sub.add_parser(
        "leaderboard",
        help="rank proxy files on a ground truth (benchmarks/ground_truth.py): Spearman, Kendall, "
        "rho_s@k with bootstrap CIs, baselines, and each proxy's measured MILP plans",
    )
    lb.add_argument("ground_truth", help="a ground-truth CSV (with its settings .json beside it)")
    lb.add_argument(
        "--proxy",
        dest="proxies",
        action="append",
        default=None,
        help="proxy name or file; repeatable (default: every built-in proxy)",
    )
    lb.add_argument(
        "--budget",
        dest="budgets",
        action="append",
        type=float,
        default=None,
        help="effective bits at which each proxy's MILP plan is measured; repeatable",
    )
    lb.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per CI (default 1000)")
    lb.add_argument("--out", required=True, help="output prefix: writes OUT.csv, OUT.md, OUT.png")
    lb.add_argument("--quiet", action="store_true", help="no progress bars")
    device_arg(lb)

    ep = sub.add_parser(
        "evolve-proxy",
        help="EMQ: genetic programming of a proxy expression on a ground truth's training plans; rerun to resume",
    )
    ep.add_argument("ground_truth", help="a ground-truth CSV (with its settings .json beside it)")
    ep.add_argument(
        "--out", default="proxies/emq_evolved.toml", help="proxy file to write (default proxies/emq_evolved.toml)"
    )
    ep.add_argument(
        "--checkpoint",
        default="runs/emq/gp.pkl",
        help="saved after every generation; a rerun resumes (default runs/emq/gp.pkl)",
    )
    ep.add_argument("--population", type=int, default=64, help="genomes per generation (default 64)")
    ep.add_argument("--generations", type=int, default=30, help="generations (default 30)")
    ep.add_argument("--seed", type=int, default=0, help="seed of the GP (default 0)")
    ep.add_argument("--quiet", action="store_true", help="no progress bars")
    device_arg(ep)

    sub.add_parser("list", help="list built-in proxies, solvers, quantizers and search spaces")
    return p
