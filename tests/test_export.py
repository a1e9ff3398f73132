"""Exports: a GGUF file whose planned tensors transformers reads back as exactly the
simulated values (logits equal), and llama-quantize's tensor-type file."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan, fingerprint
from mpsearch.core.space import SearchSpace
from mpsearch.export import ExportError, export
from mpsearch.models import load_model
from mpsearch.quant import applied
from mpsearch.quant.ggml import TYPES
from tests.conftest import tiny_gguf


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf")
    return path, load_model(str(path))


def gguf_plan(lm, pick, importance=True) -> Plan:
    """One format per decision of the gguf space, chosen by ``pick(decision)``."""
    decisions = SearchSpace.from_file("gguf").build(lm.model)
    tensors = {m.name: {"weight": pick(d)} for d in decisions for m in d.members}
    imp = None
    if importance:
        g = torch.Generator().manual_seed(3)
        imp = {m.name: torch.rand(m.in_features, generator=g) ** 2 for d in decisions for m in d.members}
    return Plan(lm.model_id, fingerprint(lm.model), tensors, importance=imp)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_exported_gguf_loads_in_transformers_with_the_simulated_logits(source, tmp_path):
    from transformers import AutoModelForCausalLM

    path, lm = source
    cycle = iter(range(10**6))
    plan = gguf_plan(lm, lambda d: [f for f in d.formats if not f.is_full][next(cycle) % (len(d.formats) - 1)])
    types = {f.key for f in plan.weight_formats().values()}
    assert len(types) == len(TYPES)  # every GGUF type once at least
    plan.save(tmp_path / "plan.json")
    out = export(tmp_path / "plan.json", to="gguf", out=tmp_path / "out.gguf", model=str(path))

    ids = torch.tensor([[1, 40, 50, 60, 3, 70, 80, 90, 4, 45]])
    with applied(lm.model, Plan.load(tmp_path / "plan.json")):
        want = logits(lm.model, ids)
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, ids), want, rtol=0, atol=0)
    reader = gguf.GGUFReader(out)
    written = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert written["blk.0.attn_q.weight"] == plan.tensors["model.layers.0.self_attn.q_proj"]["weight"].key
    assert written["token_embd.weight"] == "f32"  # outside the plan: copied as it was
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<unk>", "<s>", "</s>"]


def test_the_importance_vector_changes_the_exported_bytes(source, tmp_path):
    path, lm = source
    q4 = Format.parse("q4_0")
    a = export(gguf_plan(lm, lambda d: q4), to="gguf", out=tmp_path / "a.gguf", model=str(path))
    b = export(gguf_plan(lm, lambda d: q4, importance=False), to="gguf", out=tmp_path / "b.gguf", model=str(path))
    ta, tb = (next(t for t in gguf.GGUFReader(f).tensors if t.name == "blk.0.ffn_up.weight") for f in (a, b))
    assert (ta.data != tb.data).any()


def test_a_format_without_a_ggml_type_is_refused_naming_the_tensor(source, tmp_path):
    path, lm = source
    plan = gguf_plan(lm, lambda d: Format(4, 32))
    with pytest.raises(ExportError, match=r"model\.layers\.\d+\..*u4g32a has no GGML type"):
        export(plan, to="gguf", out=tmp_path / "x.gguf", model=str(path))
    assert not (tmp_path / "x.gguf").exists()


def test_a_model_that_is_not_a_gguf_file_is_refused(tiny_run, tmp_path):
    folder = tiny_run().model
    lm = load_model(folder)
    plan = gguf_plan(lm, lambda d: Format.parse("q8_0"), importance=False)
    with pytest.raises(ExportError, match="convert_hf_to_gguf"):
        export(plan, to="gguf", out=tmp_path / "x.gguf", model=folder)


def test_the_tensor_type_file_has_one_anchored_line_per_tensor(source, tmp_path):
    path, lm = source
    plan = gguf_plan(
        lm, lambda d: d.formats[-1] if d.name.endswith("down_proj") else Format.parse("iq4_nl"), importance=False
    )
    out = export(plan, to="llama.cpp-tensor-types", out=tmp_path / "types.txt", model=str(path))
    lines = out.read_text().splitlines()
    assert len(lines) == 14 and "#" not in out.read_text()
    assert r"^blk\.0\.attn_q\.weight$=IQ4_NL" in lines
    assert r"^blk\.1\.ffn_down\.weight$=F16" in lines


def test_a_search_in_the_gguf_space_saves_plans_with_their_imatrix_and_they_export_exactly(tmp_path, monkeypatch):
    """The whole path on a tiny GGUF model: calibration importance -> proxy table with the
    imatrix-weighted error -> MILP plan -> saved with its importance -> `mpsearch export`
    -> transformers reads back the simulated values."""
    from transformers import AutoModelForCausalLM

    from mpsearch.cli import main
    from mpsearch.run.search import SearchConfig, search
    from tests.conftest import tiny_text

    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "calib.txt").write_text(tiny_text(1))
    (tmp_path / "eval.txt").write_text(tiny_text(2))
    cfg = SearchConfig(
        model=str(path),
        calibration=str(tmp_path / "calib.txt"),
        evaluation=str(tmp_path / "eval.txt"),
        space="gguf",
        proxies=("fisher",),
        budgets=("5.0", "uniform:q4_k"),
        calib_chunks=2,
        calib_seq_len=32,
        eval_chunks=2,
        eval_seq_len=32,
        refine=2,
        refine_chunks=1,
        refine_seq_len=32,
        out_dir=str(tmp_path / "out"),
        progress=False,
        tasks=False,
        profile=False,
    )
    res = search(cfg)
    plan_file = tmp_path / "out" / "plans" / "returned@5.0.json"
    assert plan_file.exists(), sorted(p.name for p in (tmp_path / "out" / "plans").iterdir())
    plan = Plan.load(plan_file)
    assert plan.importance and set(plan.importance) == set(plan.weight_formats())
    assert plan.metrics["effective_bits"] <= 5.0 + 1e-9
    assert "imatrix" in plan.provenance["importance"]
    assert res.table.loc[res.table.plan == "uniform-q4_k", "effective_bits"].item() == 4.5

    assert (
        main(
            [
                "export",
                str(plan_file),
                "--to",
                "gguf",
                "--out",
                str(tmp_path / "plan.gguf"),
                "--model",
                str(path),
                "--quiet",
            ]
        )
        == 0
    )
    lm = load_model(str(path))
    ids = torch.tensor([[1, 40, 50, 60, 3, 70, 80]])
    with applied(lm.model, plan):
        want = logits(lm.model, ids)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="plan.gguf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, ids), want, rtol=0, atol=0)

    no_imatrix = search(SearchConfig(**{**cfg.__dict__, "imatrix": False, "out_dir": str(tmp_path / "plain")}))
    assert Plan.load(tmp_path / "plain" / "plans" / "returned@5.0.json").importance is None
    assert no_imatrix.table.kl.notna().all()


def test_the_rich_space_searches_mixed_quantizers_and_counts_their_costs(tiny_run):
    from mpsearch.run.search import search

    res = search(tiny_run(space="rich", budgets=("3.6",), refine=0, eval_chunks=1))
    plan = res.plans["fisher-milp@3.6"]
    assert plan.metrics["effective_bits"] <= 3.6 + 1e-9
    assert plan.importance is not None  # clip, log, k-means and outliers read the imatrix
    assert res.table.kl.notna().all()


def test_a_search_with_gptq_formats_collects_gram_matrices_and_its_plans_reapply_exactly(tiny_run, tmp_path):
    """GPTQ in a search: the proxy table's error is the real GPTQ error (from each layer
    input's Gram matrix), the plan keeps the matrices of its GPTQ tensors, and a saved
    plan measures the same after loading."""
    from mpsearch.core.plan import PlanError
    from mpsearch.measure.evaluate import Evaluator
    from mpsearch.models.data import leading_tokens
    from mpsearch.quant import get_quantizer, quantize
    from mpsearch.run.search import search
    from mpsearch.run.session import Session
    from tests.conftest import layer_inputs

    space = tmp_path / "gptq.toml"
    space.write_text("""name = "gptq-test"
targets = ['re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj']
[formats]
list = ["u2g32a", "gptq2g32a", "u3g32a", "gptq3g32a", "u4g32a"]
include_full = false
""")
    cfg = tiny_run(space=str(space), proxies=("gram_loss", "fisher"), budgets=("3.0",), refine=2)
    res = search(cfg)
    assert res.table.kl.notna().all()
    lm = load_model(cfg.model)
    table = res.proxy_tables["gram_loss"]
    name = "model.layers.1.mlp.down_proj"
    w = dict(lm.model.named_modules())[name].weight.detach()
    session = Session.open(cfg)
    # the Gram matrix is fitted on gram_chunks windows, the calibration windows first, and
    # the refinement slice comes after them (8 x 512 tokens made GPTQ overfit SmolLM2)
    assert session.gram_tokens.shape == (cfg.gram_chunks, cfg.calib_seq_len)
    assert torch.equal(session.gram_tokens[: cfg.calib_chunks], session.calib)
    ids = lm.tokenizer(Path(cfg.calibration).read_text(), add_special_tokens=False).input_ids
    lead = len(leading_tokens(lm.tokenizer))
    start = cfg.gram_chunks * (cfg.calib_seq_len - lead)
    assert session.slice_tokens[0, lead:].tolist() == ids[start : start + cfg.refine_seq_len - lead]
    x = layer_inputs(lm.model, session.gram_tokens, name)
    gram = (x.T @ x / len(x)).float()
    torch.testing.assert_close(session.importance[name], gram, rtol=1e-4, atol=1e-6)
    for key in ("gptq3g32a", "u3g32a"):
        fmt = Format.parse(key)
        dw = quantize(w, fmt, gram) - w
        row = table[(table.tensor == name) & (table.format == key)].iloc[0]
        assert row.qerr == pytest.approx(float((dw.double() ** 2).sum()), rel=1e-3), key
    g = table[table.format.str.startswith("gptq")].set_index(["tensor", "format"]).predicted
    u = table[table.format.str.startswith("u")].set_index(["tensor", "format"]).predicted
    lower = [g[(t, f"gptq{b}g32a")] < u[(t, f"u{b}g32a")] for t in table.tensor.unique() for b in (2, 3)]
    assert sum(lower) >= 0.9 * len(lower)  # GPTQ lowers the output error, and the full-Gram proxy sees it

    plans = sorted((tmp_path / "out" / "plans").glob("*.json"))
    gptq_plan = next(p for p in plans if any(f.quantizer == "gptq" for f in Plan.load(p).weight_formats().values()))
    plan = Plan.load(gptq_plan)
    for n, f in plan.weight_formats().items():
        if not get_quantizer(f.quantizer).reads_importance(f):  # RTN keeps nothing
            assert n not in plan.importance, (n, f.key)
            continue
        want = 2 if f.quantizer == "gptq" else 1
        assert plan.importance[n].dim() == want, (n, f.key)
    ev = Evaluator(session.eval_tokens, progress=False).fit(lm.model)
    with applied(lm.model, plan):
        again = ev.score(lm.model)
    row = res.table[res.table.plan == gptq_plan.stem].iloc[0]
    assert again.kl == pytest.approx(row.kl, rel=1e-6, abs=1e-9)

    plan.importance = {n: t.diagonal().clone() if t.dim() == 2 else t for n, t in plan.importance.items()}
    with pytest.raises(PlanError, match="needs the layer input's Gram matrix"):
        with applied(lm.model, plan):
            pass


def test_the_memo_keeps_slow_quantizations_exact_and_bounded(monkeypatch):
    """A memo hit is the tensor the quantizer gives; RTN (fast) is never kept; a different
    importance is a different entry; the byte bound evicts the least recently used."""
    from mpsearch.quant import memo as memo_mod
    from mpsearch.quant import quantize
    from mpsearch.quant.memo import QuantMemo

    g = torch.Generator().manual_seed(0)
    w, imp = torch.randn(64, 256, generator=g), torch.rand(256, generator=g)
    m = QuantMemo(max_bytes=2 * w.numel() * 4, min_seconds=0.0)
    fmt = Format.parse("iq3_s")
    first = m.quantize("a", w, fmt, imp)
    assert torch.equal(first, quantize(w, fmt, imp)) and (m.hits, m.misses) == (0, 1)
    assert torch.equal(m.quantize("a", w, fmt, imp), first) and m.hits == 1
    other = m.quantize("a", w, fmt, imp * 2 + 1)  # another importance: computed, not served
    assert m.misses == 2 and torch.equal(other, quantize(w, fmt, imp * 2 + 1))
    m.quantize("b", w, fmt, imp)  # third entry: the least recently used goes
    assert len(m) == 2 and m.bytes <= m.max_bytes
    slow = QuantMemo(min_seconds=10.0)
    slow.quantize("a", w, Format.parse("u4g64a"))
    assert len(slow) == 0

    calls = []
    real = memo_mod.quantize
    monkeypatch.setattr(memo_mod, "quantize", lambda *a: calls.append(1) or real(*a))
    lm_w = torch.randn(8, 256, generator=g)
    m2 = QuantMemo(min_seconds=0.0)
    for _ in range(3):
        m2.quantize("x", lm_w, Format.parse("q4_0"), None)
    assert len(calls) == 1
