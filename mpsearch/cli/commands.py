"""What each ``mpsearch`` command does: a thin layer over one library call, its output printed."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from ..core.files import check_out_dir, check_out_file, prepare_out_dir, shipped


def search_config(a: argparse.Namespace):
    from ..core.space import Rule, SearchSpace
    from ..run.config import SearchConfig

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
    from ..run.search import search

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

    from ..core.device import resolve_device
    from ..core.space import SearchSpace
    from ..cost.hardware import write_hardware
    from ..models import load_model
    from ..run.profile import local_hardware, profile_device

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
    from ..report.html import write_report

    if not (Path(a.run) / "results.csv").is_file():
        raise FileNotFoundError(f"{a.run} holds no results.csv: give a search's output folder")
    check_out_file(Path(a.run) / "report.html", "run folder")
    print(write_report(Path(a.run)))
    return 0


def _evolve(a: argparse.Namespace) -> int:
    from ..run.evolution import EvolutionConfig, run_evolution
    from ..run.session import Session

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
        from ..store.storage import open_storage

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
    from ..run.worker import run_worker

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
    from ..core.plan import Plan
    from ..models import load_model
    from ..report.plots import bit_heatmap

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

    from ..core.device import resolve_device
    from ..core.plan import Plan
    from ..models import load_model
    from ..quant import apply_
    from ..quant.apply import CheckedPlan

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

    from ..core.device import resolve_device
    from ..export import export

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
    from ..run.evaluation import evaluate_plan

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
    from ..proxies import list_proxies, load_proxy
    from ..run.leaderboard import run

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
    from ..run.emq import GPConfig, Problem, evolve, term_proxies, write_proxy
    from ..run.groundtruth import load_ground_truth
    from ..run.leaderboard import held_out, session_for

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
    from ..core import registry
    from ..models.loader import PACKAGED, WITH_DATA
    from ..primitives import families
    from ..proxies import list_proxies

    spaces = sorted(p.stem for p in shipped("search_spaces").glob("*.toml"))
    from ..run.targets import runtime_proxy_names

    print("proxies:", ", ".join(list_proxies()))
    print("run-time proxies (inputs, KV cache):", ", ".join(runtime_proxy_names()))
    print("solvers:", ", ".join(registry.names("solver")))
    print("quantizers:", ", ".join(registry.names("quantizer")))
    from ..cost.hardware import BUILTIN
    from ..cost.model import cost_names
    from ..kernels import kernel_names

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


#: command name -> what it runs
COMMANDS = {
    "search": _search,
    "profile-device": _profile_device,
    "report": _report,
    "evolve": _evolve,
    "worker": _worker,
    "apply": _apply,
    "eval": _eval,
    "export": _export,
    "heatmap": _heatmap,
    "leaderboard": _leaderboard,
    "evolve-proxy": _evolve_proxy,
    "list": _list,
}
