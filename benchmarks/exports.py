"""Benchmark: every quantizer-config export read back by the real package, module by module, on SmolLM2.

    .venv/bin/python benchmarks/exports.py [--plan runs/quickstart/plans/fisher-milp@uniform_3.json]

The plan (default: the quick start's Fisher MILP plan at 3.5 bits; run ``bash
scripts/search.sh`` first) is exported to each target, and the target's own code
resolves every one of SmolLM2's 210 block linears:

- compressed-tensors: ``QuantizationConfig.model_validate`` and ``apply_quantization_config``
  on the model; each module's ``quantization_scheme.weights`` against the plan;
- torchao: ``config_from_dict`` and ``quantize_`` on the model; each module's config, and the
  KL between torchao's logits and mpsearch's simulation of the same plan (2 x 128 tokens). torchao
  rounds on its affine grid (mpsearch's ``affine`` quantizer), so the plan goes over with
  ``--nearest`` (uniform -> affine, same bits and groups) and the simulation is of that plan;
- GPTQModel: ``QuantizeConfig(**file)`` and its ``dynamic_get`` per module. GPTQModel 7.7
  requires torch>=2.14.1, so it is installed here with ``--no-deps`` (the config code
  runs on torch 2.13; its kernels are not used), with the pure-Python modules its
  import needs; it is not part of the test setup;
- AutoRound: ``resolve_layer_config`` (what ``AutoRound(layer_config=...)`` runs) per module;
  installed here (``--no-deps``, with ``py-cpuinfo`` and ``datasets``, which its import needs).

Writes ``benchmarks/results/exports.csv``: ``target, package, package_version, round_trip``
(pass / fail / not installable), ``modules_checked``, ``mismatches``, ``logits_kl_vs_simulation``
(torchao: KL between its quantized model's logits and mpsearch's simulation), ``note``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from foundation import RESULTS  # noqa: E402  (same folder)

from mpsearch.core.format import PER_CHANNEL
from mpsearch.core.plan import Plan
from mpsearch.export import export
from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.quant import applied

ROOT = Path(__file__).resolve().parents[1]

#: what each benchmark-only package needs installed (all --no-deps, torch left alone)
INSTALL = {
    "gptqmodel": ["gptqmodel==7.7.0", "PyPcre", "logbar", "device-smi", "tokenicer", "defuser"],
    "auto_round": ["auto-round==0.16.1", "py-cpuinfo", "datasets"],
}


def ensure(module: str) -> str | None:
    """Import ``module``, installing it (``--no-deps``) if needed; the error text if that fails."""
    try:
        importlib.import_module(module)
        return None
    except ImportError:
        pass
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *INSTALL.get(module, [])],
        capture_output=True,
        text=True,
    )
    try:
        importlib.import_module(module)
        return None
    except ImportError as e:
        return f"{e} (pip: {r.stderr.strip()[-200:]})"


def planned(plan: Plan, model) -> dict:
    """Per planned module ``(bits, group_size or -1, symmetric)``, or None when unquantized."""
    fmts = plan.resolve([n for n, _ in model.named_modules()]).weight_formats()
    return {
        n: None if f.is_full else (f.bits, f.group_size if f.group_size != PER_CHANNEL else -1, f.symmetric)
        for n, f in fmts.items()
    }


def check_compressed_tensors(plan, want, out) -> tuple[int, str]:
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    cfg = QuantizationConfig.model_validate(json.loads(export(plan, "compressed-tensors", out / "ct.json").read_text()))
    lm = load_model("smollm2")
    apply_quantization_config(lm.model, cfg)
    mods = dict(lm.model.named_modules())
    bad = 0
    for n, w in want.items():
        s = getattr(mods[n], "quantization_scheme", None)
        got = None if s is None else (s.weights.num_bits, s.weights.group_size or -1, s.weights.symmetric)
        bad += got != w
    return bad, ""


def check_torchao(plan, want, out) -> tuple[int, str]:
    from dataclasses import replace

    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    # torchao rounds on its own affine grid: the plan's uniform formats go over with --nearest
    # (same bits, groups and symmetry, on torchao's grid), and the simulation is of that plan
    cfg = config_from_dict(json.loads(export(plan, "torchao", out / "ao.json", nearest=True).read_text()))
    bad = 0
    for n, w in want.items():
        c = cfg.fqn_to_config.get(n)
        got = (
            None
            if c is None
            else (
                int(str(c.weight_dtype).removeprefix("torch.int")),
                getattr(c.granularity, "group_size", -1),
                c.mapping_type.name == "SYMMETRIC",
            )
        )
        bad += got != w
    mapped = Plan(
        plan.model_id,
        plan.model_fingerprint,
        {n: {"weight": f if f.is_full else replace(f, quantizer="affine")} for n, f in plan.weight_formats().items()},
        {},
        {},
        {},
    )
    lm = load_model("smollm2")
    toks = token_chunks(lm.tokenizer, load_text("austen:persuasion"), 128, 2)
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(input_ids=toks).logits.float(), -1)
        with applied(lm.model, mapped):
            sim = torch.log_softmax(lm.model(input_ids=toks).logits.float(), -1)
        quantize_(lm.model, cfg, filter_fn=None)
        ao = torch.log_softmax(lm.model(input_ids=toks).logits.float(), -1)
    kl = lambda p, q: float((p.exp() * (p - q)).sum(-1).mean())  # noqa: E731
    check_torchao.kl_vs_simulation = kl(sim, ao)
    return bad, (
        "--nearest: the plan's uniform formats on torchao's affine grid; KL(ref||mpsearch affine simulation) "
        f"{kl(ref, sim):.3f}, "
        f"KL(ref||torchao) {kl(ref, ao):.3f}, KL(simulation||torchao) {kl(sim, ao):.2e}, max |logit diff| "
        f"{float((sim - ao).abs().max()):.2e}"
    )


def check_gptqmodel(plan, want, out) -> tuple[int, str]:
    from gptqmodel.quantization.config import QuantizeConfig

    d = json.loads(export(plan, "gptqmodel", out / "gptqmodel.json").read_text())
    cfg = QuantizeConfig(
        bits=d["bits"], group_size=d["group_size"], sym=d["sym"], desc_act=d["desc_act"], dynamic=d["dynamic"]
    )
    bad = 0
    for n, w in want.items():
        if cfg.dynamic_get(n) is False:
            got = None
        else:
            got = (
                cfg.dynamic_get(n, "bits", cfg.bits),
                cfg.dynamic_get(n, "group_size", cfg.group_size),
                cfg.dynamic_get(n, "sym", cfg.sym),
            )
        bad += got != w
    return bad, "GPTQModel 7.7 requires torch>=2.14.1: installed --no-deps for its config parser only"


def check_autoround(plan, want, out) -> tuple[int, str]:
    from auto_round.compressors.config_resolution import ResolvedScheme
    from auto_round.compressors.layer_config_resolver import resolve_layer_config
    from auto_round.schemes import preset_name_to_scheme

    lc = json.loads(export(plan, "autoround", out / "autoround.json").read_text())
    lm = load_model("smollm2")
    res = resolve_layer_config(
        model=lm.model, scheme=ResolvedScheme.from_scheme(preset_name_to_scheme("W4A16"), "W4A16"), layer_config=lc
    )
    bad = 0
    for n, w in want.items():
        r = res.get(n)
        got = None if r is None or r["bits"] >= 16 else (r["bits"], r["group_size"], r["sym"])
        bad += got != w
    return bad, "resolved with AutoRound's resolve_layer_config (W4A16 base scheme)"


TARGETS = [
    ("compressed-tensors", "compressed-tensors", "compressed_tensors", check_compressed_tensors),
    ("torchao", "torchao", "torchao", check_torchao),
    ("gptqmodel", "gptqmodel", "gptqmodel", check_gptqmodel),
    ("autoround", "auto-round", "auto_round", check_autoround),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--plan",
        default=str(ROOT / "runs/quickstart/plans/fisher-milp@uniform_3.json"),
        help="plan to export (default: the quick start's)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    plan = Plan.load(a.plan)
    want = planned(plan, load_model("smollm2").model)
    out = ROOT / "runs" / "exports"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for target, package, module, check in TARGETS:
        err = ensure(module)
        version = importlib.metadata.version(package) if err is None else ""
        if err is not None:
            rows.append(
                {
                    "target": target,
                    "package": package,
                    "package_version": version,
                    "round_trip": "not installable",
                    "modules_checked": 0,
                    "mismatches": "",
                    "note": err,
                }
            )
            continue
        bad, note = check(plan, want, out)
        rows.append(
            {
                "target": target,
                "package": package,
                "package_version": version,
                "round_trip": "pass" if bad == 0 else "fail",
                "modules_checked": len(want),
                "mismatches": bad,
                "logits_kl_vs_simulation": getattr(check, "kl_vs_simulation", ""),
                "note": note,
            }
        )
        print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(RESULTS / "exports.csv", index=False)
    print(
        pd.DataFrame(rows)[["target", "package_version", "round_trip", "modules_checked", "mismatches"]].to_string(
            index=False
        )
    )


if __name__ == "__main__":
    main()
