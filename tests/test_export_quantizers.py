"""Plans out to the integer quantizers' configs, read back by the real packages on a tiny model."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan, fingerprint
from mpsearch.export import ExportError, export

from .conftest import tiny_llama, tiny_tokenizer


@pytest.fixture
def tiny(tmp_path):
    """A saved tiny Llama and a plan mixing bits, groups, per-channel, symmetric and fp16."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    fmts = [
        Format(bits=4, group_size=32),
        Format(bits=3, group_size=64),
        Format(bits=8, group_size=-1, symmetric=True),
        Format.full(),
        Format(bits=2, group_size=32, symmetric=True),
    ]
    tensors = {n: {"weight": fmts[i % len(fmts)]} for i, n in enumerate(names)}
    plan = Plan(str(tmp_path / "tiny"), fingerprint(model), tensors, {}, {}, {})
    return str(tmp_path / "tiny"), plan, tensors


def test_compressed_tensors_round_trip(tiny, tmp_path):
    """The real package parses the file and applies it; every module carries the planned scheme."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from transformers import AutoModelForCausalLM

    folder, plan, tensors = tiny
    out = export(plan, "compressed-tensors", tmp_path / "ct.json", model=folder)
    cfg = ct.QuantizationConfig.model_validate(json.loads(out.read_text()))
    model = AutoModelForCausalLM.from_pretrained(folder)
    ct.apply_quantization_config(model, cfg)
    mods = dict(model.named_modules())
    for name, entry in tensors.items():
        f, scheme = entry["weight"], getattr(mods[name], "quantization_scheme", None)
        if f.is_full:
            assert scheme is None and name in cfg.ignore
            continue
        w = scheme.weights
        assert (w.num_bits, w.group_size, w.symmetric) == (
            f.bits,
            None if f.group_size == -1 else f.group_size,
            f.symmetric,
        ), name
        assert str(getattr(w.strategy, "value", w.strategy)) == ("channel" if f.group_size == -1 else "group")
    untouched = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in tensors]
    assert untouched and all(getattr(mods[n], "quantization_scheme", None) is None for n in untouched)  # lm_head stays


def test_torchao_round_trip_reproduces_the_simulated_logits(tiny, tmp_path):
    """torchao reads its FqnToConfig back, quantizes each planned module with the planned dtype and
    groups, and -- for a plan in ``affine`` formats, torchao's own grid -- gives exactly mpsearch's logits."""
    pytest.importorskip("torchao")
    from dataclasses import replace

    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    from mpsearch.quant import applied

    folder, plan, tensors = tiny
    with pytest.raises(
        ExportError, match="not this target's grid.*--nearest"
    ):  # uniform formats round elsewhere in torchao
        export(plan, "torchao", tmp_path / "ao.json", model=folder)
    affine = {
        n: {"weight": e["weight"] if e["weight"].is_full else replace(e["weight"], quantizer="affine")}
        for n, e in tensors.items()
    }
    plan = Plan(plan.model_id, plan.model_fingerprint, affine, {}, {}, {})
    cfg = config_from_dict(json.loads(export(plan, "torchao", tmp_path / "ao.json", model=folder).read_text()))
    for name, entry in affine.items():
        f, c = entry["weight"], cfg.fqn_to_config[name]
        if f.is_full:
            assert c is None
            continue
        assert c.weight_dtype == getattr(torch, f"int{f.bits}")
        assert getattr(c.granularity, "group_size", None) == (None if f.group_size == -1 else f.group_size)
        assert (c.mapping_type.name == "SYMMETRIC") == f.symmetric
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(model, plan, check=False):
        simulated = model(input_ids=ids).logits
    quantize_(model, cfg, filter_fn=None)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    assert torch.allclose(theirs, simulated, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    group=st.sampled_from([16, 32, -1]),
    sym=st.booleans(),
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 10),
)
def test_affine_is_torchaos_grid_bit_for_bit(bits, group, sym, seed, scale):
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from mpsearch.quant import quantize

    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.mul_(scale)
        lin.weight[0, :16] = torch.rand(16) * scale  # an all-positive group: the range must still reach 0
    ours = quantize(lin.weight.detach().clone(), Format(bits=bits, group_size=group, symmetric=sym, quantizer="affine"))
    quantize_(
        lin,
        IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerAxis(0) if group == -1 else PerGroup(group),
            mapping_type=MappingType.SYMMETRIC if sym else MappingType.ASYMMETRIC,
        ),
    )
    assert torch.equal(ours, lin.weight.dequantize())


def test_a_format_the_target_cannot_express_is_refused_or_mapped_and_reported(tiny, tmp_path, caplog):
    folder, plan, tensors = tiny
    name = next(iter(tensors))
    plan.tensors[name] = {"weight": Format.parse("nf4g64s")}
    with pytest.raises(ExportError, match=f"{name}.*nf4g64s.*--nearest"):
        export(plan, "compressed-tensors", tmp_path / "x.json", model=folder)
    assert not (tmp_path / "x.json").exists()
    out = export(plan, "compressed-tensors", tmp_path / "x.json", model=folder, nearest=True)
    assert (
        f"--nearest: {name} nf4g64s -> w4g64s" in caplog.text
    )  # NormalFloat's codebook -> the integer grid of its bits and groups
    groups = json.loads(out.read_text())["config_groups"].values()
    assert any(
        name in g["targets"] and g["weights"]["num_bits"] == 4 and g["weights"]["group_size"] == 64 for g in groups
    )


def test_gptqmodel_dynamic_keys_are_anchored_and_each_matches_only_its_module(tiny, tmp_path):
    """GPTQModel's first-match regex semantics, re-run here: every module gets its planned scheme and
    no key matches a module other than its own (``layers.1.`` must not catch ``layers.11.``)."""
    import re

    folder, plan, tensors = tiny
    d = json.loads(export(plan, "gptqmodel", tmp_path / "g.json", model=folder).read_text())
    names = list(tensors)
    for key in d["dynamic"]:
        pattern = key[2:] if key[:2] in ("+:", "-:") else key
        assert [n for n in names if re.search(pattern, n)] == [pattern[1:-1].replace("\\", "")]
    for name, entry in tensors.items():
        f = entry["weight"]
        hit = next((k for k in d["dynamic"] if re.search(k[2:], name)), None)
        if f.is_full:
            assert hit is not None and hit.startswith("-:")
            continue
        over = d["dynamic"][hit] if hit else {}
        got = (over.get("bits", d["bits"]), over.get("group_size", d["group_size"]), over.get("sym", d["sym"]))
        assert got == (f.bits, f.group_size, f.symmetric), name


def test_autoround_layer_config_names_every_module(tiny, tmp_path):
    folder, plan, tensors = tiny
    lc = json.loads(export(plan, "autoround", tmp_path / "a.json", model=folder).read_text())
    assert set(lc) == set(tensors)
    for name, entry in tensors.items():
        f = entry["weight"]
        assert lc[name] == (
            {"bits": 16} if f.is_full else {"bits": f.bits, "group_size": f.group_size, "sym": f.symmetric}
        )


def test_gptqmodel_refuses_bits_its_kernels_lack(tiny, tmp_path):
    folder, plan, tensors = tiny
    name = next(iter(tensors))
    plan.tensors[name] = {"weight": Format(bits=5, group_size=32)}
    with pytest.raises(ExportError, match=f"{name}.*5-bit.*--nearest"):
        export(plan, "gptqmodel", tmp_path / "g.json", model=folder)


def test_split_fused_projections_are_reported(tiny, tmp_path, caplog):
    folder, plan, tensors = tiny
    export(plan, "compressed-tensors", tmp_path / "c.json", model=folder)
    assert "the fused projections get different formats" in caplog.text  # the fixture gives q/k/v different formats


def test_autoround_resolves_every_module_to_the_plan(tiny, tmp_path):
    """AutoRound's own resolver (what ``AutoRound(layer_config=...)`` runs) on the exported file."""
    pytest.importorskip("auto_round")
    from auto_round.compressors.config_resolution import ResolvedScheme
    from auto_round.compressors.layer_config_resolver import resolve_layer_config
    from auto_round.schemes import preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    folder, plan, tensors = tiny
    lc = json.loads(export(plan, "autoround", tmp_path / "a.json", model=folder).read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    res = resolve_layer_config(
        model=model, scheme=ResolvedScheme.from_scheme(preset_name_to_scheme("W4A16"), "W4A16"), layer_config=lc
    )
    for n, entry in plan.tensors.items():
        f, r = entry["weight"], res[n]
        if f.is_full:
            assert r["bits"] >= 16
        else:
            assert (r["bits"], r["group_size"], r["sym"]) == (f.bits, f.group_size, f.symmetric), n
