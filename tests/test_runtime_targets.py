"""Activations and the KV cache: quantizers, hooks, bit accounting, calibration, the decode path, the joint search."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsearch.core.format import Format, FormatError
from mpsearch.core.plan import Plan, PlanError, fingerprint
from mpsearch.measure.evaluate import DecodeEvaluator
from mpsearch.quant import applied, apply_, get_quantizer
from mpsearch.quant.activation import quantize_cross, quantize_token
from mpsearch.quant.calibrate import calibrate
from mpsearch.quant.hooks import RuntimeHooks
from mpsearch.quant.kvcache import _normalise, quantize_kvtok, storage_bits

from .conftest import tiny_llama

K0 = "model.layers.0.self_attn.k_proj"
V0 = "model.layers.0.self_attn.v_proj"


def _cache_keys(model, ids, hooks_formats=None, calibration=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), RuntimeHooks(model, hooks_formats or {}, calibration):
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache.layers[0].keys


def test_keys_are_quantized_before_the_rotary_embedding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, ids = tiny_llama(), torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    fmt = Format.parse("kvtok3")
    got = _cache_keys(model, ids, {(K0, "k_cache"): fmt})
    # by hand: the attention's input, its key projection quantized, then RoPE
    seen = []
    h = dict(model.named_modules())[K0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        k = quantize_kvtok(attn.k_proj(seen[0]), fmt, None, attn.head_dim, "k_cache")
        k = k.view(1, 24, -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(seen[0], torch.arange(24)[None])
        _, want = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(got, want)
    # quantizing after RoPE instead gives other keys: the test can tell the two apart
    plain = _cache_keys(model, ids)
    after = quantize_kvtok(plain.transpose(1, 2).reshape(1, 24, -1), fmt, None, attn.head_dim, "k_cache")
    assert not torch.allclose(after.reshape(1, 24, -1, attn.head_dim).transpose(1, 2), got)


def test_attention_sinks_stay_unquantized_in_prefill_and_decode():
    from transformers import DynamicCache

    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    fmt = replace(Format.parse("kvtok2"), params=())
    sink = Format(2, -1, False, "kvquant", (("sinks", 3),))
    calib = calibrate(model, {(V0, "v_cache"): [sink]}, ids)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=ref, use_cache=True)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), RuntimeHooks(model, {(V0, "v_cache"): sink}, calib):
        model(input_ids=ids[:, :2], cache=cache, use_cache=True)  # a prefill of 2, then decode one token at a time
        for t in range(2, 12):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
    got, want = cache.layers[0].values, ref.layers[0].values
    torch.testing.assert_close(got[:, :, :3], want[:, :, :3])
    assert not torch.allclose(got[:, :, 3:], want[:, :, 3:])
    assert fmt.key == "kvtok2"


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    tokens=st.integers(1, 300),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 16, 64]),
    outliers=st.sampled_from([None, 0.01, 0.05]),
    sinks=st.integers(0, 4),
    nuq=st.booleans(),
    target=st.sampled_from(["k_cache", "v_cache"]),
)
def test_kv_bits_count_every_stored_piece(bits, tokens, heads, head_dim, outliers, sinks, nuq, target):
    """The accounting equals the pieces the quantizer actually keeps: codes, per-channel or per-group
    scale and zero, the codebook, every outlier (value + index) it leaves exact, and the fp16 sinks."""
    width = heads * head_dim
    params = tuple(sorted({"nuq": nuq, "sinks": sinks, **({"outliers": outliers} if outliers else {})}.items()))
    fmt = Format(bits, -1, False, "kvquant", params)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(tokens))
    calib = {"mid": torch.zeros(width), "half": torch.ones(width)}
    _, mid, half, mask, _ = _normalise(x[sinks:] if sinks < tokens else x[:0], fmt, calib, head_dim, target)
    n = max(tokens - sinks, 0)
    kept = int(mask.sum())  # outliers the quantizer really stored exactly
    scales = width if target == "k_cache" else n * (width // head_dim)  # (centre, half-range) pairs
    count = (
        min(sinks, tokens) * width * 16
        + n * width * bits
        + kept * (16 + 16)
        + scales * 2 * 16
        + (2**bits * 16 if nuq else 0)
    )
    assert storage_bits(fmt, target, tokens, width, head_dim) == count
    naive = Format(bits, -1, False, "kvtok")
    assert storage_bits(naive, target, tokens, width, head_dim) == tokens * width * bits + tokens * heads * 2 * 16
    assert storage_bits(Format.full(), target, tokens, width, head_dim) == tokens * width * 16


def test_kernel_proportion_equals_direct_counting(model, tokens):
    name = "model.layers.1.mlp.down_proj"
    fmt = Format.parse("tok4")
    seen = []
    h = dict(model.named_modules())[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        for seq in tokens:
            model(input_ids=seq[None], use_cache=False)
    h.remove()
    zeros = sum(int(((quantize_token(x, fmt) == 0) & (x != 0)).sum()) for x in seen)
    nonzero = sum(int((x != 0).sum()) for x in seen)
    with torch.no_grad(), RuntimeHooks(model, {(name, "input"): fmt}) as hooks:
        for seq in tokens:
            model(input_ids=seq[None], use_cache=False)
    assert hooks.kernel[(name, "input")] == [zeros, nonzero]
    assert 0 < hooks.kernel_proportions()[(name, "input")] == zeros / nonzero < 1


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 32), bits=st.integers(2, 8), seed=st.integers(0, 10**6))
def test_activation_quantizers_keep_their_grid(rows, cols, bits, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    fmt = Format.parse(f"tok{bits}")
    q = quantize_token(x, fmt)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    assert torch.all((q - x).abs() <= scale / 2 + 1e-5)  # within half a step of the token's grid
    torch.testing.assert_close(quantize_token(q, fmt), q)  # on the grid already: unchanged
    # CrossQuant with alpha = 1 is per-token; otherwise an element rounds to zero exactly when it is
    # below half its own step t_i^a * c_j^(1-a) / qmax (its kernel, counted directly)
    cal = {"channel_absmax": x.abs().amax(0)}
    torch.testing.assert_close(quantize_cross(x, Format(bits, -1, True, "cross", (("alpha", 1.0),)), cal), q)
    cross = quantize_cross(x, Format(bits, -1, True, "cross", (("alpha", 0.15),)), cal)
    step = x.abs().amax(-1, keepdim=True).pow(0.15) * cal["channel_absmax"].pow(0.85) / qmax
    ratio = x.abs() / step
    clear = (ratio - 0.5).abs() > 1e-4  # away from a rounding tie
    assert torch.equal(((cross == 0) & (x != 0))[clear], ((ratio < 0.5) & (x != 0))[clear])


def test_formats_parse_and_refuse_what_they_cannot_do():
    assert Format.parse("kvquant3").key == "kvquant3"
    assert Format.parse("kvtok4g8").group_size == 8
    assert Format.parse("cross8").quantizer == "cross"
    with pytest.raises(FormatError, match="alpha"):
        Format(8, -1, True, "cross", (("alpha", 2.0),))
    with pytest.raises(FormatError, match="1..8"):
        Format(12, -1, False, "kvquant")


def test_plans_with_runtime_targets_check_save_and_apply(model, tokens, tmp_path):
    fp = fingerprint(model)
    kq = Format.parse("kvquant3")
    with pytest.raises(PlanError, match="k_proj"):
        apply_(model, Plan("tiny", fp, {V0: {"k_cache": kq}}))
    with pytest.raises(PlanError, match="quantizes"):
        apply_(model, Plan("tiny", fp, {K0: {"input": kq}}))
    with pytest.raises(PlanError, match="calibration"):
        apply_(model, Plan("tiny", fp, {K0: {"k_cache": kq}}))
    plan = Plan("tiny", fp, {K0: {"k_cache": kq, "input": Format.parse("cross6")}, V0: {"v_cache": kq}})
    sites = {(n, t): [f] for n, e in plan.tensors.items() for t, f in e.items()}
    plan.calibration = calibrate(model, sites, tokens)
    assert any(k.endswith("/codebook") for k in plan.calibration) and any(
        k.endswith("/channel_absmax") for k in plan.calibration
    )
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.tensors == plan.tensors and set(back.calibration) == set(plan.calibration)
    with torch.no_grad():
        ref = model(input_ids=tokens[:1]).logits
        with applied(model, back) as m:
            q = m(input_ids=tokens[:1]).logits
        after = model(input_ids=tokens[:1]).logits
    assert not torch.allclose(q, ref) and torch.equal(after, ref)  # the hooks are gone after the block
    (tmp_path / "p.calibration.safetensors").write_bytes(
        (tmp_path / "p.calibration.safetensors").read_bytes()[:-8] + b"\0" * 8
    )
    with pytest.raises(PlanError, match="calibration file"):
        Plan.load(tmp_path / "p.json")


def test_decode_path_scores_what_the_full_forward_scores():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    ev = DecodeEvaluator(ids, decode=8, chunk=16, progress=False).fit(model)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, -9:-1].float(), -1)
    nll = float(-logp.gather(-1, ids[:, -8:, None]).mean())
    assert ev.reference_.nll == pytest.approx(nll, abs=1e-4)
    assert abs(ev.score(model).kl) < 1e-3
    with pytest.raises(ValueError, match="decode"):
        DecodeEvaluator(ids, decode=40)


def test_joint_search_cli_on_a_tiny_model(tiny_run, tmp_path):
    """W+A+KV in one MILP from the CLI: every target in the plans, the memory budget kept, joint no worse predicted than
    separate."""
    from mpsearch.cli import main
    from mpsearch.run.search import SearchConfig

    cfg: SearchConfig = tiny_run()
    out = tmp_path / "joint"
    rc = main(
        [
            "search",
            "--model",
            cfg.model,
            "--calibration",
            cfg.calibration,
            "--evaluation",
            cfg.evaluation,
            "--space",
            "llama_wakv",
            "--proxy",
            "measured_kl",
            "--budget",
            "60KB",
            "--context",
            "48",
            "--decode",
            "8",
            "--act-bits",
            "7",
            "--calib-chunks",
            "2",
            "--calib-seq-len",
            "32",
            "--eval-chunks",
            "2",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "results.csv").set_index("plan")
    for alloc in ("joint", "separate"):
        row = table.loc[f"measured_kl+kl-{alloc}@60KB"]
        assert row.total_bytes <= 60_000 * (1 + 1e-9) and row.weight_bytes + row.kv_bytes == pytest.approx(
            row.total_bytes
        )
        assert row.act_bits <= 7 + 1e-9 and math.isfinite(row.kl) and 0 <= row.kernel_proportion < 1
        plan = Plan.load(out / "plans" / f"measured_kl_kl-{alloc}@60KB.json")
        targets = {t for e in plan.tensors.values() for t in e}
        assert {"weight", "input", "k_cache", "v_cache"} <= targets
    # the joint problem may take any split the separate one takes: its predicted loss is no higher
    assert (
        table.loc["measured_kl+kl-joint@60KB", "predicted"]
        <= table.loc["measured_kl+kl-separate@60KB", "predicted"] + 1e-12
    )
    assert set(pd.read_csv(out / "runtime_table.csv").columns) >= {
        "decision",
        "target",
        "format",
        "kl",
        "fisher",
        "mse",
        "kernel",
    }
    assert 'id="fig-pareto"' in (out / "report.html").read_text()  # every search writes its report
    assert (
        main(
            [
                "search",
                "--space",
                "llama_wkv",
                "--budget",
                "3.5",
                "--context",
                "64",
                "--quiet",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        != 0
    )


def test_a_kv_space_without_context_or_with_a_bits_budget_fails_before_loading():
    from mpsearch.run.search import SearchConfig

    with pytest.raises(ValueError, match="--context"):
        SearchConfig(space="llama_wkv", budgets=("100MB",))
    with pytest.raises(ValueError, match="memory"):
        SearchConfig(space="llama_wkv", budgets=("3.5",), context=2048)
    with pytest.raises(ValueError, match="weights only"):
        SearchConfig(space="llama", budgets=("3.5",), context=2048)


def test_exports_carry_inputs_where_the_target_can_and_refuse_the_rest(tmp_path, monkeypatch):
    """compressed-tensors writes per-token / per-tensor inputs (validated by the package); a KV format
    is refused, naming the tensor, unless --weights-only drops it."""
    import json

    from mpsearch.export import ExportError, export
    from mpsearch.models import loader

    model = tiny_llama()
    monkeypatch.setattr(loader, "load_model", lambda spec: type("LM", (), {"model": model, "model_id": "tiny"})())
    import mpsearch.export.int_schemes as ints

    monkeypatch.setattr(ints, "load_model", lambda spec: type("LM", (), {"model": model, "model_id": "tiny"})())
    w = Format.parse("u4g32a")
    q0 = "model.layers.0.self_attn.q_proj"
    plan = Plan(
        "tiny",
        fingerprint(model),
        {q0: {"weight": w, "input": Format.parse("tok8")}, K0: {"weight": w, "k_cache": Format.parse("kvtok4")}},
    )
    with pytest.raises(ExportError, match=r"k_proj'\]\.k_cache.*--weights-only"):
        export(plan, "compressed-tensors", tmp_path / "ct.json", model="tiny")
    out = export(plan, "compressed-tensors", tmp_path / "ct.json", model="tiny", weights_only=True)
    cfg = json.loads(out.read_text())
    groups = {tuple(g["targets"]): g for g in cfg["config_groups"].values()}
    assert (
        groups[(q0,)]["input_activations"]["strategy"] == "token"
        and groups[(q0,)]["input_activations"]["num_bits"] == 8
    )
    assert groups[(K0,)]["input_activations"] is None
    with pytest.raises(ExportError, match="gptqmodel cannot carry .*2 such entries"):
        export(plan, "gptqmodel", tmp_path / "g.json", model="tiny")


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 40),
    heads=st.integers(1, 3),
    bits=st.integers(2, 8),
    nuq=st.booleans(),
    outliers=st.sampled_from([None, 0.05]),
    target=st.sampled_from(["k_cache", "v_cache"]),
    seed=st.integers(0, 10**6),
)
def test_kvquant_keeps_outliers_exact_and_the_rest_on_its_levels(tokens, heads, bits, nuq, outliers, target, seed):
    from mpsearch.quant.kvcache import calibrate_kvquant, quantize_kvquant

    head_dim = 8
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads * head_dim, generator=g) * torch.linspace(0.5, 3, heads * head_dim)
    params = tuple(sorted({"nuq": nuq, **({"outliers": outliers} if outliers else {})}.items()))
    fmt = Format(bits, -1, False, "kvquant", params)
    cal = calibrate_kvquant(x, torch.rand(x.shape, generator=g), fmt, head_dim, target)
    q = quantize_kvquant(x, fmt, cal, head_dim, target)
    z, mid, half, mask, r = _normalise(x, fmt, cal, head_dim, target)
    levels = cal["codebook"] if nuq else torch.linspace(-1, 1, 2**bits)
    assert levels.numel() == 2**bits and torch.all(levels[1:] >= levels[:-1])
    qr = q.reshape(r.shape)
    assert torch.equal(qr[mask], r[mask].half().float())  # outliers stored exactly (fp16)
    grid = (mid + half * levels.reshape(-1, *[1] * r.dim())).expand(
        -1, *r.shape
    )  # every level mapped back, per element
    dist = (qr[None] - grid).abs().min(0).values[~mask]
    scale = (mid.abs() + half).expand(r.shape)[~mask]
    assert torch.all(dist <= 1e-5 * (1 + scale))  # everything else is a level of the codebook, mapped back
    if outliers:
        k = math.ceil(outliers * (r.shape[-1]))
        assert int(mask.sum()) == k * (r.numel() // r.shape[-1])


@pytest.mark.parametrize("key", ["kvtok4", "kvquant3", "tok8", "cross8", "adalog4", "tensor8"])
def test_constant_and_zero_vectors_quantize_to_finite_values(key):
    """A zero (or constant) group once divided by a scale that fp16 rounded to 0: NaN in the cache."""
    fmt = Format.parse(key)
    q = get_quantizer(fmt.quantizer)
    x = torch.zeros(4, 32)
    x[2] = 1.5  # one constant row
    if key.startswith("kv"):
        cal = q.calibrate(x, None, fmt, 16, "k_cache") if q.calibrate else None
        out = q(x, fmt, cal, 16, "k_cache")
    else:
        cal = q.calibrate(x, None, fmt) if q.calibrate else None
        out = q(x, fmt, cal)
    assert torch.isfinite(out).all() and torch.equal(out[0], x[0])


def test_kv_hooks_and_decode_path_on_a_gemma_style_model():
    """Gemma-3 names match Llama's (self_attn.k_proj / v_proj, a head_dim): the cache hooks and the decode path run
    there too."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=16,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    ev = DecodeEvaluator(ids, decode=8, chunk=16, progress=False).fit(model)
    sites = {
        (f"model.layers.{i}.self_attn.{p}_proj", f"{p}_cache"): Format.parse("kvtok2") for i in range(2) for p in "kv"
    }
    with RuntimeHooks(model, sites) as hooks:
        q = ev.score(model)
    assert q.kl > 0 and set(hooks.kernel) == set(sites)
    assert all(0 < n <= 39 * 32 for _, n in hooks.kernel.values())  # 32 prefilled + 7 decoded tokens of 32 elements


def test_an_interrupted_runtime_kl_pass_resumes_where_it_stopped(model, tokens, monkeypatch):
    import mpsearch.run.targets as tg
    from mpsearch.core.space import SearchSpace

    space = SearchSpace.from_file("llama_wkv")
    decisions = tg.runtime_decisions(space, model, space.build(model))
    pairs = [(d, f) for d in decisions for f in d.formats]
    calibration = calibrate(model, {d.site: list(d.formats) for d in decisions}, tokens)
    monkeypatch.setattr(tg, "SAVE_EVERY", 3)
    calls = []
    enter = tg.RuntimeHooks.__enter__

    def counting(self):
        calls.append(1)
        if len(calls) == 7 and getattr(counting, "stop", True):
            raise KeyboardInterrupt
        return enter(self)

    monkeypatch.setattr(tg.RuntimeHooks, "__enter__", counting)
    with pytest.raises(KeyboardInterrupt):
        tg.runtime_table(model, decisions, tokens[:2], tokens[:1], calibration, "w")
    counting.stop = False
    calls.clear()
    table = tg.runtime_table(model, decisions, tokens[:2], tokens[:1], calibration, "w")
    quantized = sum(not f.is_full for _, f in pairs)
    # the first 6 pairs measured before the interruption were saved (every 3); the rerun measures the rest
    done_before = sum(not f.is_full for _, f in pairs[:6])
    assert len(calls) == quantized - done_before and len(table) == len(pairs)
    calls.clear()
    tg.runtime_table(model, decisions, tokens[:2], tokens[:1], calibration, "w")
    assert calls == []  # the whole table now comes from the cache


def test_values_without_a_codebook_need_no_calibration(model, tokens):
    """KVQuant values are ranged per token on the fly: with nuq off there is nothing to calibrate, and a plan
    without calibration applies (it was refused as missing its calibration)."""
    uniform_kq = Format(3, -1, False, "kvquant", (("nuq", False), ("outliers", 0.01), ("sinks", 1)))
    assert calibrate(model, {(V0, "v_cache"): [uniform_kq]}, tokens) == {}
    plan = Plan("tiny", fingerprint(model), {V0: {"v_cache": uniform_kq}})
    with torch.no_grad(), applied(model, plan) as m:
        assert torch.isfinite(m(input_ids=tokens[:1]).logits).all()
    with pytest.raises(PlanError, match="calibration"):
        apply_(
            model, Plan("tiny", fingerprint(model), {K0: {"k_cache": uniform_kq}})
        )  # keys still need their channel ranges


def test_a_bad_runtime_proxy_is_refused_before_loading(tmp_path):
    from mpsearch.proxies.proxy import ProxyFileError
    from mpsearch.run.search import SearchConfig

    bad = tmp_path / "p.toml"
    bad.write_text('name = "p"\nexpression = "dw * 2"\n')  # a weight name: not a run-time primitive
    with pytest.raises(ProxyFileError, match="names"):
        SearchConfig(space="llama_wkv", budgets=("100MB",), context=256, runtime_proxy=str(bad))
    with pytest.raises(ProxyFileError, match="built-in"):
        SearchConfig(space="llama_wkv", budgets=("100MB",), context=256, runtime_proxy="nope")


def test_cached_calibration_is_served_only_intact(model, tokens):
    """The calibration cache entry is checked like every other: a damaged one is recomputed, never served."""
    from mpsearch.run.cached import cached_calibration
    from mpsearch.store.cache import cache_dir

    sites = {
        (K0, "k_cache"): [Format.parse("kvquant3")],
        ("model.layers.0.mlp.down_proj", "input"): [Format.parse("cross8")],
    }
    first = cached_calibration(model, sites, tokens, "w")
    (path,) = (cache_dir() / "calibration").glob("*.bin")
    again = cached_calibration(model, sites, tokens, "w")
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    healed = cached_calibration(model, sites, tokens, "w")
    assert all(torch.equal(healed[k], first[k]) for k in first)
    assert cached_calibration(model, sites, tokens[:2], "w").keys() == first.keys()  # other tokens: another entry
    assert len(list((cache_dir() / "calibration").glob("*.bin"))) == 2


def test_weight_only_paths_refuse_a_space_with_run_time_targets():
    """evolve, the leaderboard and the predictor open a weights-only Session: they must not drop a space's inputs / KV
    silently."""
    from mpsearch.run.search import SearchConfig
    from mpsearch.run.session import Session

    cfg = SearchConfig(space="llama_wkv", budgets=("100MB",), context=256)
    with pytest.raises(ValueError, match="only `mpsearch search`"):
        Session.open(cfg)


def test_a_fisher_runtime_proxy_skips_the_measured_kl_pass(model, tokens, monkeypatch):
    import mpsearch.run.targets as tg
    from mpsearch.core.space import SearchSpace

    space = SearchSpace.from_file("llama_wkv")
    decisions = tg.runtime_decisions(space, model, space.build(model))
    calibration = calibrate(model, {d.site: list(d.formats) for d in decisions}, tokens)
    calls = []
    enter = tg.RuntimeHooks.__enter__
    monkeypatch.setattr(tg.RuntimeHooks, "__enter__", lambda self: (calls.append(1), enter(self))[1])
    fisher = tg.load_runtime_proxy("fisher")
    for _ in range(2):  # computed, then read back from the cache
        table = tg.runtime_table(model, decisions, tokens[:2], tokens[:1], calibration, "w", measure_kl=False)
        losses = tg.runtime_losses(table, decisions, fisher)
        assert calls == [] and table["kl"].isna().all() and table["fisher"].notna().all()
        assert all(
            np.all(np.isfinite(l)) and l[[f.is_full for f in d.formats].index(True)] == 0
            for l, d in zip(losses, decisions)
        )
        with pytest.raises(ValueError, match="kl is measured only"):
            tg.runtime_losses(table, decisions, tg.load_runtime_proxy("kl"))  # not measured: never a silent NaN plan
