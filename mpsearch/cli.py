"""The ``mpsearch`` command: ``search``, ``evolve``, ``worker``, ``apply``, ``eval``, ``export``, ``heatmap``,
``leaderboard``, ``evolve-proxy``, ``profile-device``, ``report`` and ``list``.

Every command is a thin layer over one library call (``mpsearch.run.search``,
``mpsearch.apply_``, ``mpsearch.evaluate_plan``); errors in the input are printed as
one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .core.files import check_out_dir, check_out_file, prepare_out_dir, shipped
from .models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION


def search_config(a: argparse.Namespace):
    from .core.space import Rule, SearchSpace
    from .run.config import SearchConfig

    base = SearchSpace.from_file(a.space).base_format
    rules = [
        Rule.parse_cli(kind, text, base)
        for kind in ("pin", "min_bits", "max_bits", "exclude")
        for text in getattr(a, kind)
    ]
    return SearchConfig(
        model=a.model,
        calibration=a.calibration,
        evaluation=a.evaluation,
        space=a.space,
        proxies=tuple(a.proxy),
        budgets=tuple(a.budget),
        solver=getattr(a, "solver", "milp"),
        rules=tuple(rules),
        calib_seq_len=a.calib_seq_len,
        calib_chunks=a.calib_chunks,
        gram_chunks=a.gram_chunks,
        eval_seq_len=a.eval_seq_len,
        hessian_probes=a.hessian_probes,
        hessian_sequences=a.hessian_sequences,
        eval_chunks=a.eval_chunks,
        baselines=not getattr(a, "no_baselines", False),
        measure=not getattr(a, "no_measure", False),
        refine=getattr(a, "refine", 0),
        refine_chunks=getattr(a, "refine_chunks", 4),
        refine_seq_len=getattr(a, "refine_seq_len", 256),
        bos=a.bos,
        imatrix=not getattr(a, "no_imatrix", False),
        memo_mb=a.memo_mb,
        threads=a.threads,
        device=getattr(a, "device", "auto"),
        seed=a.seed,
        out_dir=a.out,
        use_cache=not a.no_cache,
        progress=not a.quiet,
        checkpoint_every=a.checkpoint_every,
        context=getattr(a, "context", 0),
        batch=getattr(a, "batch", 1),
        decode=getattr(a, "decode", 128),
        runtime_proxy=getattr(a, "runtime_proxy", "auto"),
        act_bits=getattr(a, "act_bits", 0.0),
        input_min_bits=getattr(a, "input_min_bits", 0),
        allocations=tuple(getattr(a, "allocation", None) or ("joint", "separate")),
        constraints=tuple(getattr(a, "constraint", None) or ()),
        hardware=getattr(a, "hardware", "local"),
        energy_table=getattr(a, "energy_table", "horowitz-45nm"),
        prefill=getattr(a, "prefill", 512),
        profile=not getattr(a, "no_profile", False),
        tasks=not getattr(a, "no_tasks", False),
        task_items=getattr(a, "task_items", 100),
    )


def _search(a: argparse.Namespace) -> int:
    from .run.search import search

    res = search(search_config(a))
    print(summary(res.table))
    for key, where in (("correlation", "evaluation text"), ("slice_correlation", "refinement slice")):
        for proxy, c in res.summary.get(key, {}).items():
            print(
                f"{proxy}: rank correlation of predicted and measured KL over {c['plans']} plans ({where}): "
                f"Spearman {c['spearman']:.3f}, Kendall {c['kendall']:.3f}"
            )
    for budget, source in res.summary.get("returned", {}).items():
        print(f"returned @ {budget}: {source} (best measured KL on the refinement slice)")
    for line in res.summary.get("warnings", []):
        print(f"warning: {line}")
    print(
        f"\nplans: {res.out_dir / 'plans'}\nresults: {res.out_dir / 'results.csv'}\nreport: "
        f"{res.out_dir / 'report.html'}"
    )
    return _finite_or_fail(a.cmd, res.summary.get("nonfinite", []), f"; every output is written to {res.out_dir}")


def _finite_or_fail(cmd: str, bad: list[str], note: str = "") -> int:
    """Exit 1, with one line naming them, when a measured figure is NaN or infinite: a NaN result never exits 0."""
    if not bad:
        return 0
    print(
        f"mpsearch {cmd}: error: measured NaN or infinite quality for {', '.join(bad[:5])}"
        + (" ..." if len(bad) > 5 else "")
        + f" (the model's outputs overflow with this plan, or without it){note}",
        file=sys.stderr,
    )
    return 1


def _profile_device(a: argparse.Namespace) -> int:
    import torch

    from .core.device import resolve_device
    from .core.space import SearchSpace
    from .cost.hardware import write_hardware
    from .cost.profile import local_hardware, profile_device
    from .models import load_model

    if resolve_device(a.device).type != "cpu":  # the hooks read a host clock: on a GPU they would time kernel launches
        raise ValueError(
            f"--device {a.device}: profile-device times kernels on the CPU only (its timers read a host clock, which "
            "on a GPU times kernel launches, not kernels); use --device cpu"
        )
    if a.out:
        check_out_dir(a.out)
    torch.set_num_threads(a.threads)
    hw = local_hardware(refresh=a.no_cache)
    print(
        f"{hw.description}: "
        + ", ".join(f"{k} {v / 1e9:.1f} GOPS" for k, v in hw.peak.items())
        + f", bandwidth {hw.bandwidth / 1e9:.1f} GB/s"
    )
    lm = load_model(a.model)
    decisions = SearchSpace.from_file(a.space).build(lm.model)
    table = profile_device(
        lm.model,
        decisions,
        tokens=(a.batch, a.batch * a.prefill),
        context=a.context,
        refresh=a.no_cache,
        progress=not a.quiet,
        fingerprint=str(lm.model_id),
        device="cpu",
    )
    best = table.rows.loc[table.rows.groupby(["in_features", "out_features", "format", "tokens"]).ms.idxmin()]
    print(
        best.pivot_table(index="format", columns=["tokens", "in_features", "out_features"], values="ms")
        .round(3)
        .to_string()
    )
    print(
        f"fixed part: decode {table.fixed['decode_ms']:.2f} ms at {a.context} tokens, prefill "
        f"{table.fixed['prefill_ms']:.1f} ms"
    )
    if a.out:
        out = prepare_out_dir(a.out)
        table.rows.to_csv(out / "kernels.csv", index=False)
        (out / "fixed.json").write_text(
            json.dumps({**table.fixed, "machine": table.machine, "model": a.model}, indent=1)
        )
        write_hardware(hw, out / "hardware.toml")
        print(f"written to {out}")
    return 0


def _report(a: argparse.Namespace) -> int:
    from .report.html import write_report

    if not (Path(a.run) / "results.csv").is_file():
        raise FileNotFoundError(f"{a.run} holds no results.csv: give a search's output folder")
    check_out_file(Path(a.run) / "report.html", "run folder")
    print(write_report(Path(a.run)))
    return 0


def _evolve(a: argparse.Namespace) -> int:
    from .run.evolution import EvolutionConfig, run_evolution
    from .run.session import Session

    lo, hi = _window(a.window)
    cfg = search_config(a)
    if len(cfg.proxies) != 1:
        raise ValueError("evolve seeds from one proxy's front; give a single --proxy")
    evo = EvolutionConfig(
        trials=a.trials,
        population=a.population,
        objective=a.objective,
        min_bits=lo,
        max_bits=hi,
        seed=a.seed,
        study_name=a.study_name,
    )
    check_out_dir(a.out)
    if a.storage and "://" in a.storage:
        from .store.storage import open_storage

        open_storage(a.storage, a.heartbeat)  # a bad URL or a missing driver fails before the model loads
    session = Session.open(cfg)
    df = run_evolution(
        session, cfg.proxies[0], evo, a.out, storage=a.storage, work=not a.no_work, heartbeat=a.heartbeat
    )
    print(trial_summary(df))
    study = a.storage or f"{a.out}/study.log"
    print(f"front: {a.out}/front.csv  trials: {a.out}/trials.csv  plot: {a.out}/pareto.png  study: {study}")
    print(f"more workers: mpsearch worker --study {a.study_name} --storage {study}")
    return 0


def _worker(a: argparse.Namespace) -> int:
    from .run.worker import run_worker

    if a.out:
        check_out_dir(a.out)
    df = run_worker(
        a.storage,
        a.study,
        threads=a.threads,
        device=getattr(a, "device", None),
        progress=not a.quiet,
        use_cache=not a.no_cache,
        heartbeat=a.heartbeat,
        sampler_seed=a.seed,
        out_dir=a.out,
    )
    print(trial_summary(df))
    return 0


def trial_summary(df) -> str:
    """Counts by what happened to each trial.

    Measured, repeated, outside the window, failed (killed), waiting, running."""
    complete = df.state == "COMPLETE"
    measured = complete & df.measured.fillna(False).astype(bool)
    dup = measured & df.duplicate.fillna(False).astype(bool)
    outside = complete & ~measured
    failed = df.state.isin(["FAIL", "PRUNED"])
    text = (
        f"{len(df)} trials: {int((measured & ~dup).sum())} plans measured, {int(dup.sum())} repeats answered from the "
        "study, "
        f"{int(outside.sum())} outside the bits window (not measured), {int(failed.sum())} failed or interrupted"
    )
    for state in ("WAITING", "RUNNING"):
        if (df.state == state).any():
            text += f", {int((df.state == state).sum())} {state.lower()}"
    return text


def _window(text: str | None) -> tuple[float | None, float | None]:
    if not text:
        return None, None
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--window takes LOW:HIGH effective bits, e.g. 3.25:4.75; got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"--window LOW:HIGH needs finite LOW <= HIGH, got {text!r}")
    return lo, hi


def _heatmap(a: argparse.Namespace) -> int:
    from .core.plan import Plan
    from .models import load_model
    from .report.plots import bit_heatmap

    check_out_file(a.out)
    plan = Plan.load(a.plan)
    in_features = None
    if a.model:
        model = load_model(a.model).model
        plan.check_model(model)
        in_features = {n: m.in_features for n, m in model.named_modules() if hasattr(m, "in_features")}
    out = bit_heatmap(
        plan.weight_formats(),
        a.out,
        in_features,
        title=f"{Path(a.plan).name}: {plan.metrics.get('effective_bits', float('nan')):.3f} effective bits",
    )
    print(f"wrote {out}")
    return 0


def summary(table) -> str:
    cols = [
        c
        for c in (
            "plan",
            "kind",
            "effective_bits",
            "ppl",
            "kl",
            "slice_kl",
            "cloze_acc",
            "mc_acc",
            "cost_measured_decode_ms",
            "cost_energy_mj",
            "meets_constraints",
        )
        if c in table
    ] + [c for c in table if c.startswith("predicted_")]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _apply(a: argparse.Namespace) -> int:
    import torch

    from .core.device import resolve_device
    from .core.plan import Plan
    from .models import load_model
    from .quant import apply_
    from .quant.apply import CheckedPlan

    device = resolve_device(a.device)
    torch.set_num_threads(a.threads)
    plan = Plan.load(a.plan)
    out = check_out_dir(
        a.out, marker=APPLIED_MARKER
    )  # never over a folder of someone else's (their own checkpoint, say)
    if plan.runtime_formats():
        (n, t), f = next(iter(plan.runtime_formats().items()))
        raise ValueError(
            f"tensors[{n!r}].{t}: {f.key} quantizes a run-time tensor, which a saved model folder cannot carry "
            f"({len(plan.runtime_formats())} such entries); measure it with `mpsearch eval` or apply it with "
            "mpsearch.quant.applied()"
        )
    lm = load_model(a.model)
    checked = CheckedPlan.of(lm.model, plan, space=a.space, all_tensors=a.all_tensors)
    apply_(lm.model, checked, device=device)  # quantized there (GPTQ, GGUF searches)
    lm.model.to("cpu")  # written from the CPU
    save_model_dir(lm, out, plan_path=str(a.plan))
    print(
        f"applied formats to {len(checked.plan.weight_formats())} tensors; wrote a model folder {out} "
        f"(load it with --model {out}; weights are dequantized fp32 values on the plan's grid)"
    )
    return 0


def save_model_dir(lm, out: Path, plan_path: str) -> None:
    """A folder transformers (and ``--model``) loads: config, tokenizer, safetensors weights."""
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    (out / APPLIED_MARKER).write_text(f"fake-quantized (dequantized) weights of plan {plan_path}\n")


#: what ``apply`` leaves in the model folders it writes (and what lets it write there again)
APPLIED_MARKER = "mpsearch_plan.txt"


def _export(a: argparse.Namespace) -> int:
    import torch

    from .core.device import resolve_device
    from .export import export

    if resolve_device(a.device).type != "cpu":  # checked like every model command's, then said what it means here
        logging.getLogger(__name__).info(
            "export encodes on the CPU whatever --device says: the file's bytes do not depend on the machine"
        )
    check_out_file(a.out)
    torch.set_num_threads(a.threads)
    options = {"full_type": a.full_type} if a.to == "gguf" else {}
    if a.nearest:
        if a.to not in NEAREST_TARGETS:
            raise ValueError(f"--nearest applies to {', '.join(NEAREST_TARGETS)}, not {a.to}")
        options["nearest"] = True
    out = export(a.plan, a.to, a.out, model=a.model, weights_only=a.weights_only, **options)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


#: exporters that can map a format they cannot express to the nearest one they can
NEAREST_TARGETS = ("compressed-tensors", "torchao", "gptqmodel", "autoround")


def _eval(a: argparse.Namespace) -> int:
    from .run.evaluation import evaluate_plan

    res = evaluate_plan(
        a.plan,
        model=a.model,
        evaluation=a.evaluation,
        seq_len=a.eval_seq_len,
        chunks=a.eval_chunks,
        threads=a.threads,
        progress=not a.quiet,
        space=a.space,
        all_tensors=a.all_tensors,
        context=a.context,
        decode=a.decode,
        device=a.device,
    )
    print(json.dumps(res, indent=1))
    q = res["plan"]
    return _finite_or_fail(a.cmd, [] if all(math.isfinite(q[k]) for k in ("ppl", "kl", "nll")) else [str(a.plan)])


def _leaderboard(a: argparse.Namespace) -> int:
    from .proxies import list_proxies, load_proxy
    from .run.leaderboard import run

    check_out_file(Path(f"{a.out}.csv"))
    proxies = a.proxies or list_proxies()
    evolved = {
        n for n in (load_proxy(p).name for p in proxies) if n.startswith("emq_")
    }  # the GP names its proxies emq_*
    board = run(a.ground_truth, proxies, a.out, a.budgets or [], a.boot, evolved, progress=not a.quiet, device=a.device)
    cols = ["proxy", "spearman", "spearman_lo", "spearman_hi", "kendall", "rho_top20"]
    print(board[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {Path(a.out).with_suffix('.csv')}, .md and .png")
    return 0


def _evolve_proxy(a: argparse.Namespace) -> int:
    from .run.emq import GPConfig, Problem, evolve, term_proxies, write_proxy
    from .run.groundtruth import load_ground_truth
    from .run.leaderboard import held_out, session_for

    check_out_file(a.out)
    check_out_file(a.checkpoint, "--checkpoint")
    gt, meta = load_ground_truth(a.ground_truth)
    session = session_for(meta, [], measure=False, progress=not a.quiet, extra=term_proxies(), device=a.device)
    problem = Problem.from_session(session, gt)
    cfg = GPConfig(population=a.population, generations=a.generations, seed=a.seed)
    res = evolve(problem, cfg, a.checkpoint, progress=not a.quiet)
    test, _ = problem.fitness(res["fn"], held_out(gt["plan"]))
    path = write_proxy(res, a.out, Path(a.out).stem, f"Held-out Spearman {test:.3f} on {meta['model']}.")
    print(
        f"best: {res['tree']}\ntrain Spearman {res['train_spearman']:.3f}, held-out {test:.3f}; rejected by the "
        f"screen: {res['rejected']}"
    )
    print(f"wrote {path}")
    return 0


def _list(a: argparse.Namespace) -> int:
    from .core import registry
    from .models.loader import PACKAGED, WITH_DATA
    from .primitives import families
    from .proxies import list_proxies

    spaces = sorted(p.stem for p in shipped("search_spaces").glob("*.toml"))
    from .run.targets import runtime_proxy_names

    print("proxies:", ", ".join(list_proxies()))
    print("run-time proxies (inputs, KV cache):", ", ".join(runtime_proxy_names()))
    print("solvers:", ", ".join(registry.names("solver")))
    print("quantizers:", ", ".join(registry.names("quantizer")))
    from .cost.hardware import BUILTIN
    from .cost.model import cost_names
    from .kernels import kernel_names

    print("costs (--constraint NAME<=LIMIT):", ", ".join(cost_names()))
    print("hardware profiles (--hardware):", ", ".join(["local"] + sorted(p.stem for p in BUILTIN.glob("*.toml"))))
    print("kernels (profile-device):", ", ".join(kernel_names()))
    print("exporters:", ", ".join(registry.names("exporter")))
    print("search spaces:", ", ".join(spaces))
    print("packaged models:", ", ".join([*PACKAGED, *WITH_DATA]), "(or a .gguf file, a model folder, a hub id)")
    print("primitives (family: names):")
    for name, fam in families().items():
        print(f"  {name}: {', '.join(fam.provides)}  ({fam.about})")
    print("  per (tensor, format): w, dw, numel, bits, qerr, kl (measured KL, its own pass)")
    return 0


def _export_targets() -> str:
    from .core import registry

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
    s.set_defaults(func=_search)

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
    pd_.set_defaults(func=_profile_device)

    rp = sub.add_parser("report", help="(re)write a search folder's report.html")
    rp.add_argument("run", help="a search's output folder (holding results.csv)")
    rp.set_defaults(func=_report)

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
    e.set_defaults(func=_evolve)

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
    w.set_defaults(func=_worker)

    ap = sub.add_parser(
        "apply", help="apply a saved plan and write a loadable model folder with the fake-quantized weights"
    )
    common(ap)
    scope_args(ap)
    ap.add_argument("plan", help="plan JSON file")
    ap.add_argument(
        "--out", required=True, help="model folder to write (config, tokenizer, model.safetensors); --model takes it"
    )
    ap.set_defaults(func=_apply)

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
    ev.set_defaults(func=_eval)

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
    ex.set_defaults(func=_export)

    hm = sub.add_parser("heatmap", help="draw a plan's per-layer bit map (PNG)")
    hm.add_argument("plan", help="plan JSON file")
    hm.add_argument("--out", required=True, help="PNG file to write")
    hm.add_argument("--model", default=None, help="load this model to show effective bits (scales and zeros included)")
    hm.set_defaults(func=_heatmap)

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
    lb.set_defaults(func=_leaderboard)

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
    ep.set_defaults(func=_evolve_proxy)

    ls = sub.add_parser("list", help="list built-in proxies, solvers, quantizers and search spaces")
    ls.set_defaults(func=_list)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if getattr(a, "proxy", 1) is None:
        a.proxy = ["fisher"]
    if getattr(a, "budget", 1) is None:
        a.budget = ["uniform:3"]
    logging.basicConfig(level=logging.WARNING if getattr(a, "quiet", False) else logging.INFO, format="%(message)s")
    if getattr(a, "quiet", False):
        _quiet_libraries()
    try:
        return a.func(a)
    except user_errors() as e:  # bad input: one line naming the problem; crashes keep their traceback
        print(f"mpsearch {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a folder it may not write: one line naming the place, not a traceback
        from .store.cache import NO_SPACE, NOT_WRITABLE

        if e.errno not in NO_SPACE | NOT_WRITABLE:
            raise
        print(f"mpsearch {a.cmd}: error: {e.strerror}: {e.filename or 'a file it writes'}", file=sys.stderr)
        return 1


def _quiet_libraries() -> None:
    """``--quiet`` silences the progress bars of the libraries too (transformers' model loading, GGUF conversion)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "the input is wrong", each with a message naming the problem."""
    from .core.registry import UnknownComponentError
    from .models.data import DataError
    from .models.loader import ModelError
    from .primitives import PrimitiveError
    from .solvers import SolverError

    # ValueError covers PlanError, SpaceError, BudgetError, FormatError, ExpressionError, ProxyFileError
    return (ValueError, UnknownComponentError, DataError, ModelError, PrimitiveError, SolverError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
