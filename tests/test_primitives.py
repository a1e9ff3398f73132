"""Every primitive family against a direct computation on a tiny Llama; caching per family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpsearch.core.space import SearchSpace
from mpsearch.primitives import PrimitiveSettings, compute_primitives, families, family_of, primitive_names
from mpsearch.primitives.activations import GPTQ_DAMP, KERNEL_BITS
from mpsearch.primitives.hessian import hutchinson
from mpsearch.proxies import PRIMITIVE_NAMES, list_proxies, load_proxy
from mpsearch.proxies.table import proxy_table
from mpsearch.store.cache import cache_dir

from .conftest import layer_inputs, tiny_llama

UP = "model.layers.0.mlp.up_proj"
GATE = "model.layers.0.mlp.gate_proj"
DOWN = "model.layers.1.mlp.down_proj"


def test_every_primitive_name_has_one_family_and_proxies_can_read_it():
    provided = [p for f in families().values() for p in f.provides]
    assert len(provided) == len(set(provided))
    assert primitive_names() <= PRIMITIVE_NAMES
    assert family_of("htrace").name == "hessian"
    with pytest.raises(KeyError, match="no primitive family provides 'nope'"):
        family_of("nope")


def test_mean_gradient(model, tokens):
    prims = compute_primitives(model, [UP], tokens, {"grad"}, use_cache=False, progress=False)
    w = dict(model.named_modules())[UP].weight
    w.requires_grad_(True)
    acc = torch.zeros_like(w)
    for seq in tokens:
        acc += torch.autograd.grad(model(input_ids=seq[None], labels=seq[None]).loss, [w])[0]
    w.requires_grad_(False)
    torch.testing.assert_close(prims.get("grad", UP), acc / len(tokens), rtol=1e-4, atol=1e-10)


def test_activation_statistics_match_a_direct_computation(model, tokens):
    prims = compute_primitives(
        model, [UP, GATE, DOWN], tokens, {"hinv", "act_entropy"}, use_cache=False, progress=False
    )
    for name in (UP, DOWN):
        x = layer_inputs(model, tokens, name)
        h = x.T @ x / len(x)
        h += GPTQ_DAMP * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
        torch.testing.assert_close(
            prims.get("hinv", name).double(), torch.linalg.inv(h).diagonal(), rtol=1e-3, atol=1e-8
        )
        a = x.abs()
        p = a / a.sum(1, keepdim=True)
        entropy = float(-(p * torch.where(p > 0, p.log(), 0)).sum(1).mean())
        assert float(prims.get("act_entropy", name)) == pytest.approx(entropy, rel=1e-5)
        assert float(prims.get("act_absmax", name)) == pytest.approx(float(a.max()), rel=1e-6)
        c = x - x.mean()
        assert float(prims.get("act_kurtosis", name)) == pytest.approx(
            float((c**4).mean() / (c**2).mean() ** 2), rel=1e-6
        )
        rms = x.pow(2).mean(1, keepdim=True).sqrt()
        assert float(prims.get("act_outlier", name)) == pytest.approx(float((a > 6 * rms).double().mean()), abs=1e-12)
        # the kernel is what symmetric per-token round-to-nearest actually sends to zero
        kernel = prims.get("kernel", name)
        for b in (2, 3, 4, 8):
            step = a.amax(1, keepdim=True) / (2 ** (b - 1) - 1)
            zero = float((torch.round(x / step) == 0).double().mean())
            assert float(kernel[b - KERNEL_BITS[0]]) == pytest.approx(zero, abs=1e-7)  # stored as float32
        assert torch.all(kernel[1:] <= kernel[:-1])  # more bits, fewer zeros
    # gate and up read one input: the shared computation gives both the same statistics
    for k in ("hinv", "act_entropy", "kernel", "xtx"):
        assert torch.equal(prims.get(k, UP), prims.get(k, GATE))


def test_the_gram_family_is_x_t_x_over_n_and_its_diagonal_is_xtx_bit_for_bit(model, tokens):
    prims = compute_primitives(model, [UP, GATE, DOWN], tokens, {"gram", "xtx"}, use_cache=False, progress=False)
    for name in (UP, DOWN):
        x = layer_inputs(model, tokens, name)
        torch.testing.assert_close(prims.get("gram", name).double(), x.T @ x / len(x), rtol=1e-4, atol=1e-7)
        assert torch.equal(
            prims.get("gram", name).diagonal(), prims.get("xtx", name)
        )  # GGUF formats quantize the same from either
    assert torch.equal(prims.get("gram", UP), prims.get("gram", GATE))


def test_the_gram_loss_proxy_reads_the_whole_output_error(all_tables):
    tables, prims = all_tables
    t = tables["gram_loss"]
    r = t[(t.tensor == DOWN) & (t.format == "u3g64a")].iloc[0]
    w = dict(tiny_llama().named_modules())[DOWN].weight.detach()
    from mpsearch.core.format import Format
    from mpsearch.quant import quantize

    dw = (quantize(w, Format.parse("u3g64a")) - w).double()
    oerr = float(torch.einsum("oi,ij,oj->", dw, prims.get("gram", DOWN).double(), dw))
    scale = 0.5 * float(prims.get("fisher", DOWN).sum()) / (r.numel * float(prims.get("xtx", DOWN).mean()))
    assert r.predicted == pytest.approx(scale * oerr, rel=1e-5)


def test_synflow_matches_a_direct_computation_and_leaves_the_model_alone(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prims = compute_primitives(model, [UP, DOWN], tokens, {"synflow"}, use_cache=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    twin = tiny_llama().double()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
    w = dict(twin.named_modules())[DOWN].weight.requires_grad_(True)
    r = twin(inputs_embeds=torch.ones(1, tokens.shape[1], 64, dtype=torch.float64)).logits.sum()
    (g,) = torch.autograd.grad(r, [w])
    torch.testing.assert_close(prims.get("synflow", DOWN), (w * g).abs().float().detach(), rtol=1e-5, atol=0)
    assert float(prims.get("synflow", DOWN).sum()) > 0


def test_hessian_family_is_hutchinson_per_sequence(model, tokens):
    settings = PrimitiveSettings(hessian_probes=3, hessian_sequences=2, seed=4)
    prims = compute_primitives(
        model, [UP, DOWN], tokens, {"htrace"}, settings=settings, use_cache=False, progress=False
    )
    direct = hutchinson(model, [UP, DOWN], tokens[:2], probes=3, chunk=1, seed=4, progress=False)
    for n in (UP, DOWN):
        assert float(prims.get("htrace", n)) == pytest.approx(direct.trace[n], rel=1e-5)
        assert float(prims.get("htrace_se", n)) == pytest.approx(direct.trace_se[n], rel=1e-5)
        torch.testing.assert_close(prims.get("hdiag", n), direct.diag[n])


def test_each_family_is_cached_on_its_own(model, tokens):
    names = [UP, DOWN]
    compute_primitives(model, names, tokens, {"fisher"}, progress=False)
    (grads,) = (cache_dir() / "primitives").glob("gradients-*.safetensors")
    stamp = grads.stat().st_mtime_ns
    both = compute_primitives(model, names, tokens, {"fisher", "xtx"}, progress=False)
    assert grads.stat().st_mtime_ns == stamp  # gradients were read, not recomputed
    assert len(list((cache_dir() / "primitives").glob("activations-*.safetensors"))) == 1
    assert set(both.values) == {"fisher", "grad", *families()["activations"].provides}
    # the Hessian's settings are part of its key; other families ignore them
    a = compute_primitives(
        model, names, tokens, {"htrace"}, settings=PrimitiveSettings(hessian_probes=1), progress=False
    )
    b = compute_primitives(
        model, names, tokens, {"htrace"}, settings=PrimitiveSettings(hessian_probes=2), progress=False
    )
    assert a.key != b.key and len(list((cache_dir() / "primitives").glob("hessian-*"))) == 2
    c = compute_primitives(
        model, names, tokens, {"fisher"}, settings=PrimitiveSettings(hessian_probes=2), progress=False
    )
    assert (
        grads.stat().st_mtime_ns == stamp
        and c.key == compute_primitives(model, names, tokens, {"fisher"}, progress=False).key
    )


def test_nan_in_a_cached_family_is_recomputed(model, tokens, caplog):
    from safetensors.torch import load_file, save_file

    first = compute_primitives(model, [UP], tokens, {"xtx"}, progress=False)
    (path,) = (cache_dir() / "primitives").glob("activations-*.safetensors")
    state = load_file(str(path))
    state[f"xtx::{UP}"][0] = float("nan")
    save_file(state, str(path))
    again = compute_primitives(model, [UP], tokens, {"xtx"}, progress=False)
    assert "unusable" in caplog.text and torch.equal(first.xtx[UP], again.xtx[UP])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="hessian_probes"):
        PrimitiveSettings(hessian_probes=0)


@pytest.fixture(scope="module")
def all_tables():
    """Every built-in proxy's table on a tiny model (measured KL on a short slice)."""
    from mpsearch.primitives.sensitivity import measured_kl

    model = tiny_llama()
    toks = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    decisions = SearchSpace.from_file("llama").build(model)
    proxies = [load_proxy(n) for n in list_proxies()]
    needs = set().union(*(p.needs for p in proxies))
    prims = compute_primitives(
        model,
        [m.name for d in decisions for m in d.members],
        toks,
        needs,
        use_cache=False,
        progress=False,
        settings=PrimitiveSettings(hessian_probes=2),
    )
    kl = measured_kl(model, decisions, toks[:1], use_cache=False, progress=False)
    prims.kl = {(t, f): v for t, f, v in kl.itertuples(index=False)}
    return {p.name: proxy_table(p, model, decisions, prims, progress=False) for p in proxies}, prims


def test_every_builtin_proxy_gives_a_finite_table(all_tables):
    tables, _ = all_tables
    assert len(tables) >= 14
    for name, table in tables.items():
        assert np.isfinite(table.predicted).all(), name
        quantized = table[table.format != "fp16"]
        assert quantized.predicted.nunique() > 1, name


@pytest.mark.parametrize(
    "name",
    [
        "mse",
        "fisher",
        "fit",
        "hawq_v2",
        "input_moment",
        "input_moment_loss",
        "baq",
        "qvlm_entropy",
        "size",
        "measured_kl",
    ],
)
def test_error_proxies_are_zero_unquantized_and_fall_with_bits(all_tables, name):
    table = all_tables[0][name]
    unquantized = table.loc[table.format == "fp16", "predicted"].abs()
    assert (unquantized <= 1e-6 * table.predicted.abs().max()).all()  # zero, or 4^-16 for size
    one = table[(table.tensor == UP) & table.format.str.endswith("g32a")].sort_values("bits")
    assert np.all(np.diff(one.predicted.to_numpy()) < 0)


def test_proxy_formulas(all_tables):
    tables, prims = all_tables
    row = lambda t, fmt: t[(t.tensor == DOWN) & (t.format == fmt)].iloc[0]  # noqa: E731
    r = row(tables["hawq_v2"], "u4g64a")
    assert r.predicted == pytest.approx(float(prims.get("htrace", DOWN)) / r.numel * r.qerr, rel=1e-6)
    r = row(tables["fit"], "u4g64a")
    assert r.predicted == pytest.approx(0.5 * float(prims.get("fisher", DOWN).sum()) / r.numel * r.qerr, rel=1e-5)
    g, w = prims.get("grad", DOWN), dict(tiny_llama().named_modules())[DOWN].weight
    r = row(tables["snip"], "u4g64a")
    assert r.predicted == pytest.approx(-float((g * w).abs().sum()) * r.bits, rel=1e-5)
    r = row(tables["grad_norm"], "u8g64a")
    assert r.predicted == pytest.approx(-float(g.norm()) * r.bits, rel=1e-5)
    r = row(tables["size"], "u3g128a")
    assert r.predicted == pytest.approx(r.numel * 4.0**-r.bits, rel=1e-9)


def test_kernel_lookup_uses_the_formats_bits(all_tables):
    from mpsearch.proxies import Proxy

    _, prims = all_tables
    model = tiny_llama()
    decisions = SearchSpace.from_file("llama").build(model)
    table = proxy_table(Proxy.from_string("k", "kernel"), model, decisions, prims, progress=False)
    k = prims.get("kernel", DOWN)
    for fmt, bits in (("u2g64a", 2), ("u4g32a", 4), ("fp16", 16)):
        got = table[(table.tensor == DOWN) & (table.format == fmt)].predicted.iloc[0]
        assert math.isclose(got, float(k[bits - 2]), rel_tol=1e-6)


def test_sliced_loss_backward_equals_the_models_own_loss(model):
    """The gradient pass runs the LM head a slice of positions at a time (Gemma's 262k vocabulary)."""
    from mpsearch.models.decoder import loss_backward

    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(4))
    w = model.model.layers[1].mlp.down_proj.weight
    w.requires_grad_(True)
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        full, w.grad = w.grad.clone(), None
        loss_backward(model, ids, positions=5)
        torch.testing.assert_close(w.grad, full, rtol=1e-5, atol=1e-9)
    finally:
        w.grad = None
        w.requires_grad_(False)
