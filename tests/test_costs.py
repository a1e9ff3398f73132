"""Cost models, hardware profiles, real kernels, the measured table, and searches under constraints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsearch.core.format import Format
from mpsearch.core.progress import SearchProgress
from mpsearch.core.space import Member
from mpsearch.cost import BudgetError
from mpsearch.cost.hardware import BUILTIN, HardwareError, load_hardware, read_hardware
from mpsearch.cost.model import ConstraintSpec, ModelShape, Workload, get_cost

from .conftest import tiny_llama

FORMATS = ["fp16", "u2g32a", "u3g64a", "u4g32a", "u4g64a", "u6g64a", "u8g32a", "u8gcha"]


def test_every_builtin_profile_loads_and_cites_its_numbers() -> None:
    names = sorted(p.stem for p in BUILTIN.glob("*.toml"))
    assert {"h100-sxm", "t4", "jetson-agx-orin", "horowitz-45nm"} <= set(names)
    kinds = set()
    for name in names:
        hw = load_hardware(name)
        kinds.add(hw.kind)
        for part in ("peak", "bandwidth", "energy_pj"):
            if getattr(hw, part):
                assert len(hw.sources[part]) > 40, (name, part)
    assert {"gpu", "edge", "energy"} <= kinds


def test_a_number_without_a_source_is_refused(tmp_path) -> None:
    p = tmp_path / "x.toml"
    p.write_text(
        'name = "x"\nfloat_type = "fp16"\n[peak]\nfp16 = 1e12\n[memory]\nbandwidth = 1e9\n[sources]\nbandwidth = "a '
        'datasheet"\n'
    )
    with pytest.raises(HardwareError, match="source"):
        read_hardware(p)
    with pytest.raises(HardwareError, match="known: local"):
        load_hardware("no-such-gpu")


@settings(max_examples=40, deadline=None)
@given(
    out=st.sampled_from([64, 192, 576, 4096]),
    inp=st.sampled_from([64, 576, 4096]),
    key=st.sampled_from(FORMATS),
    tokens=st.integers(1, 4096),
    hw=st.sampled_from(["t4", "h100-sxm", "jetson-agx-orin"]),
)
def test_roofline_is_the_slower_of_compute_and_memory(out, inp, key, tokens, hw) -> None:
    h = load_hardware(hw)
    fmt = Format.parse(key)
    m = Member("layers.0.mlp.up_proj", out, inp)
    cm = get_cost("latency_prefill")(h, Workload(prefill=tokens), ModelShape())
    bits = 16 if fmt.is_full else fmt.bits
    compute = 2 * out * inp * tokens / h.peak[h.compute_type(bits, 16)]
    memory = (out * inp * fmt.effective_bits(inp) / 8 + tokens * (inp + out) * 2) / h.bandwidth
    assert cm.member(m, fmt) == pytest.approx(max(compute, memory), rel=1e-12)


def test_decode_is_memory_bound_and_falls_with_bits() -> None:
    m = Member("layers.0.mlp.up_proj", 4096, 4096)
    for hw in ("t4", "h100-sxm", "jetson-agx-orin"):
        cm = get_cost("latency_decode")(load_hardware(hw), Workload(), ModelShape())
        t = [cm.member(m, Format.parse(k)) for k in ("u2g64a", "u4g64a", "u8g64a", "fp16")]
        assert t == sorted(t) and t[0] < t[-1] / 4, hw


def test_integer_inputs_run_on_the_integer_peak() -> None:
    t4, h100 = load_hardware("t4"), load_hardware("h100-sxm")
    assert (t4.compute_type(4, 4), t4.compute_type(8, 8), t4.compute_type(4, 16)) == ("int4", "int8", "fp16")
    assert h100.compute_type(4, 4) == "int8"  # Hopper has no int4 tensor cores


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(1, 300),
    inp=st.sampled_from([64, 128, 576]),
    key=st.sampled_from(FORMATS[1:]),
    tokens=st.integers(1, 64),
    act=st.sampled_from([4, 8, 16]),
)
def test_energy_and_bops_follow_their_tables(out, inp, key, tokens, act) -> None:
    e = load_hardware("horowitz-45nm").energy_pj
    fmt, m, w = Format.parse(key), Member("layers.0.self_attn.o_proj", out, inp), Workload(tokens=tokens, act_bits=act)
    macs = out * inp * tokens
    mac = e["fp16_mult"] + e["fp16_add"] if act == 16 else e["int8_mult"] * fmt.bits * act / 64 + e["int32_add"]
    dram = out * inp * fmt.effective_bits(inp) / 8 * e["dram_read_32bit"] / 4
    energy = get_cost("energy")(load_hardware("horowitz-45nm"), w, ModelShape())
    assert energy.member(m, fmt) == pytest.approx((macs * mac + dram) * 1e-12, rel=1e-12)
    assert get_cost("bops")(None, w, ModelShape()).member(m, fmt) == macs * fmt.bits * act
    if fmt.bits == 8 and act == 8:  # exactly Horowitz's int8 multiply, no extrapolation
        assert mac == pytest.approx(0.2 + 0.1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("latency<=3ms", "unknown cost 'latency'"),
        ("latency_decode<=3mJ", "limited in s/ms/us"),
        ("energy<=0J", "positive"),
        ("bops<=3ms", "count"),
        ("latency_decode=3ms", "cannot read"),
        ("bytes<=12", "limited in B/KB/MB/GB"),
    ],
)
def test_constraint_text_errors_name_the_problem(text, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConstraintSpec.parse(text)
    assert ConstraintSpec.parse("latency_decode<=12ms").limit == pytest.approx(0.012)
    assert ConstraintSpec.parse("bops<=2T").limit == 2e12


@settings(max_examples=25, deadline=None)
@given(key=st.sampled_from(FORMATS), rows=st.integers(1, 20), out=st.sampled_from([32, 96]), seed=st.integers(0, 99))
def test_every_kernel_computes_the_layer_it_packs(key, rows, out, seed) -> None:
    from mpsearch.kernels import get_kernel, kernels_for
    from mpsearch.kernels.torch_kernels import rtn_codes

    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(out, 128, generator=g), torch.randn(rows, 128, generator=g)
    fmt = Format.parse(key)
    if fmt.is_full:
        ref = x @ w.T
    elif fmt.group_len(128) == 128 and fmt.bits == 8:  # the int8 kernels: symmetric per channel
        s = w.abs().amax(1, keepdim=True) / 127
        ref = x @ ((w / s).round() * s).T
    else:
        grp = fmt.group_len(128)
        q, scale, lo = rtn_codes(w, fmt.bits, grp)
        ref = x @ (q.float().reshape(out, -1, grp) * scale[..., None] + lo[..., None]).reshape(out, 128).T
    names = kernels_for(fmt, 128)
    assert names
    for k in names:
        kern = get_kernel(k)
        y = kern.run(x, kern.pack(w, fmt), fmt)
        tol = 0.06 if k == "int8dyn" else 0.02  # bf16 compute; int8dyn also rounds the input to 8 bits
        assert float((y - ref).norm() / ref.norm()) < tol, (k, key)


def test_a_deployed_plan_computes_what_the_fake_quantized_model_does() -> None:
    from mpsearch.core.plan import Plan, fingerprint
    from mpsearch.kernels.deploy import deploy
    from mpsearch.quant import applied

    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    for key in ("u4g32a", "u3g64a"):
        formats = {n: Format.parse(key) for n in names}
        plan = Plan("tiny", fingerprint(model), {n: {"weight": f} for n, f in formats.items()})
        with applied(model, plan), torch.no_grad():
            ref = model(input_ids=ids).logits
            got = deploy(model, formats)(input_ids=ids).logits
        assert float((got - ref).norm() / ref.norm()) < 0.03, key
        kinds = {type(m).__name__ for m in deploy(model, formats).modules()}
        assert "KernelLinear" in kinds


def test_profile_device_times_every_shape_and_format_and_caches_it() -> None:
    from mpsearch.core.space import SearchSpace
    from mpsearch.kernels import kernels_for
    from mpsearch.run.profile import profile_device

    model = tiny_llama()
    decisions = SearchSpace.from_file("llama").build(model)
    t = profile_device(model, decisions, tokens=(1, 16), context=16, progress=False, fingerprint="tiny")
    for d in decisions:
        for m in d.members:
            for f in list(d.formats) + [Format.full()]:
                got = t.timings(m.in_features, m.out_features, f, 1)
                assert set(got) == set(kernels_for(f, m.in_features)) and all(v > 0 for v in got.values())
    assert t.fixed["decode_ms"] >= 0 and t.fixed["prefill_ms"] >= 0
    again = profile_device(model, decisions, tokens=(1, 16), context=16, progress=False, fingerprint="tiny")
    pd.testing.assert_frame_equal(t.rows, again.rows)  # from the cache, not timed again
    with pytest.raises(KeyError, match="profile-device"):
        t.ms(64, 64, Format.parse("u5g32a"), 1234)
    with pytest.raises(ValueError, match="CPU only"):  # a host clock around GPU kernels would time their launches
        profile_device(model, decisions, device="cuda", progress=False)


def test_progress_says_what_is_left_and_when_it_ends() -> None:
    p = SearchProgress(enabled=False)
    p.stage("load model")
    assert "ETA" not in p.status("x")
    p.plans(4)
    assert "ETA after the first plan" in p.status("evaluate a")
    p.measured(2.0)
    p.measured(4.0)
    assert p.eta() == pytest.approx(6.0)
    assert "2 of 4 plans measured, 2 left | ETA 0m06s" in p.status("evaluate c")


def sentences_text(n: int = 400, seed: int = 0) -> str:
    """Distinct short sentences: what the cloze and multiple-choice builders need."""
    import random

    rng = random.Random(seed)
    words = [
        "anne",
        "walked",
        "village",
        "weather",
        "cold",
        "sister",
        "church",
        "letters",
        "music",
        "captain",
        "evening",
        "garden",
        "ship",
        "road",
        "window",
        "friend",
        "morning",
        "house",
        "rain",
        "book",
    ]
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + "." for _ in range(n))


def test_a_search_under_energy_and_measured_latency_limits_carries_every_cost(tiny_run, tmp_path) -> None:
    from mpsearch.run.search import search

    (tmp_path / "story.txt").write_text(sentences_text())
    base = dict(
        profile=True, tasks=True, task_items=12, task_context=24, evaluation=str(tmp_path / "story.txt"), refine=2
    )
    free = search(tiny_run(**base))
    row = free.table.set_index("plan").loc["fisher-milp@uniform:3"]
    cols = [
        "cost_bytes",
        "cost_bops",
        "cost_energy_mj",
        "cost_latency_decode_ms",
        "cost_latency_prefill_ms",
        "cost_measured_decode_ms",
        "cost_measured_prefill_ms",
    ]
    assert all(np.isfinite(row[c]) and row[c] > 0 for c in cols)
    assert free.table[["cloze_acc", "mc_acc"]].notna().all().all()  # the reference row too
    limit = 0.97 * row["cost_energy_mj"]
    res = search(
        tiny_run(**base, constraints=(f"energy<={limit}mJ", "measured_decode<=10s"), out_dir=str(tmp_path / "limited"))
    )
    t = res.table.set_index("plan")
    got = t.loc["fisher-milp@uniform:3"]
    assert got["cost_energy_mj"] <= limit * (1 + 1e-9) and bool(got["meets_constraints"])
    assert got["predicted_fisher"] >= row["predicted_fisher"] - 1e-12  # a tighter problem cannot predict better
    returned = t.loc["returned@uniform:3"]
    assert bool(returned["meets_constraints"])
    out = res.out_dir
    costs = pd.read_csv(out / "costs.csv")
    assert list(costs.columns) == ["plan", "cost", "part", "value"] and {"fixed", "down_proj"} <= set(costs.part)
    html = (out / "report.html").read_text()
    for fig in ("pareto", "heatmap", "sensitivity", "predicted", "costs", "stages"):
        assert f'id="fig-{fig}"' in html


def test_a_limit_no_plan_meets_fails_before_the_heavy_stages(tiny_run, tmp_path) -> None:
    from mpsearch.run.search import search

    with pytest.raises(BudgetError, match=r"cannot be met: the cheapest plan costs [0-9.e+-]+ mJ"):
        search(tiny_run(constraints=("energy<=1nJ",)))
    assert not (tmp_path / "cache" / "primitives").exists()
    with pytest.raises(ValueError, match="takes one budget"):
        tiny_run(constraints=("energy<=1J",), solver="greedy")
    with pytest.raises(ValueError, match="not implemented for the joint problem"):
        tiny_run(constraints=("energy<=1J",), space="llama_wkv", context=64, decode=32)
    with pytest.raises(ValueError, match="task accuracy"):
        search(tiny_run(tasks=True, task_items=500))  # word salad has no sentences
