"""GGUF block types: bit-exact against the gguf package's dequantizers, exact bits per
weight, the fit rule, and importance weighting."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsearch.core.format import Format, FormatError
from mpsearch.quant import quantize
from mpsearch.quant.ggml import TYPES, pack

NAMES = sorted(TYPES)
#: bits per weight of each GGML block layout (ggml's type sizes)
EXPECTED_BPW = {
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k": 5.5,
    "q5_1": 6.0,
    "q5_0": 5.5,
    "q4_k": 4.5,
    "q4_1": 5.0,
    "q4_0": 4.5,
    "iq4_xs": 4.25,
    "iq4_nl": 4.5,
    "q3_k": 3.4375,
    "iq3_s": 3.4375,
    "q2_k": 2.625,
}


@st.composite
def weights(draw, block: int):
    rows = draw(st.integers(1, 3))
    blocks = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 0.02, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, block * blocks, generator=g) * scale
    kind = draw(st.sampled_from(["plain", "zeros", "outlier", "positive", "constant"]))
    if kind == "zeros":
        w[:, : block // 2] = 0
    elif kind == "outlier":
        w[0, draw(st.integers(0, block * blocks - 1))] = 40 * scale
    elif kind == "positive":
        w = w.abs()
    elif kind == "constant":
        w[:] = scale
    imp = None
    if draw(st.booleans()):
        imp = torch.rand(block * blocks, generator=g) ** 3 * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return w, imp


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_packed_bytes_dequantize_to_the_simulation_exactly(name, data):
    t = TYPES[name]
    w, imp = data.draw(weights(t.block))
    fmt = Format.parse(name)
    sim = quantize(w, fmt, imp)
    raw = pack(w, fmt, imp)
    assert raw.dtype == np.uint8 and raw.shape == (w.shape[0], w.shape[1] // t.block * t.type_size)
    back = gguf.quants.dequantize(raw, t.qtype)
    np.testing.assert_array_equal(back, sim.numpy())
    assert torch.isfinite(sim).all()


@pytest.mark.parametrize("name", NAMES)
def test_bits_per_weight_are_the_block_layouts(name):
    fmt = Format.parse(name)
    assert fmt.key == name
    assert fmt.effective_bits(TYPES[name].block * 4) == EXPECTED_BPW[name]


def test_k_quants_do_not_fit_rows_that_are_not_a_multiple_of_256():
    assert not Format.parse("q4_k").fits(576) and not Format.parse("iq4_xs").fits(576)
    assert Format.parse("q4_0").fits(576) and Format.parse("iq4_nl").fits(576)
    with pytest.raises(FormatError, match="multiple of 256"):
        quantize(torch.randn(2, 576), Format.parse("q4_k"))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_error_is_no_worse_than_the_gguf_reference_quantizer(name):
    """The weighted searches are llama.cpp's imatrix-free improvements over its reference rounding."""
    t = TYPES[name]
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 0.05
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t.qtype), t.qtype)
    ours = quantize(w, Format.parse(name)).numpy()
    assert ((ours - w.numpy()) ** 2).mean() <= ((ref - w.numpy()) ** 2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_an_importance_vector_lowers_the_error_it_weights(name):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 512, generator=g) * 0.05
    imp = torch.rand(512, generator=g) ** 4 * 10
    fmt = Format.parse(name)

    def weighted(q):
        return float((((q - w) ** 2) * imp).sum())

    assert weighted(quantize(w, fmt, imp)) < weighted(quantize(w, fmt))


def test_iq3_s_beats_q3_k_at_the_same_size_under_an_imatrix():
    """The lattice type is why llama.cpp's IQ3_S files beat its Q3_K ones at equal bytes."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 1024, generator=g) * 0.05
    imp = torch.rand(1024, generator=g) ** 2 * 10

    def weighted(key):
        return float((((quantize(w, Format.parse(key), imp) - w) ** 2) * imp).sum())

    assert Format.parse("iq3_s").effective_bits(1024) == Format.parse("q3_k").effective_bits(1024)
    assert weighted("iq3_s") < 0.9 * weighted("q3_k")


def test_a_wrong_importance_shape_is_named():
    with pytest.raises(FormatError, match="importance must have shape"):
        quantize(torch.randn(2, 64), Format.parse("q4_0"), torch.ones(32))


def test_fixed_layouts_load_from_a_short_plan_entry_and_refuse_other_fields():
    assert Format.from_dict({"quantizer": "q3_k"}) == Format.parse("q3_k")
    assert Format.from_dict(Format.parse("q6_k").to_dict()) == Format.parse("q6_k")
    with pytest.raises(FormatError, match="fixed layout"):
        Format(bits=4, group_size=64, quantizer="q4_k")


def test_uniform_keys_still_parse_and_old_plan_entries_still_load():
    for key in ("u4g64a", "u3g128s", "u8gcha", "fp16"):
        assert Format.parse(key).key == key
    old = {"bits": 4, "group_size": 64, "symmetric": False, "quantizer": "uniform", "params": {}}
    assert Format.from_dict(old).effective_bits(576) == 4.5
    with pytest.raises(FormatError, match="not a format key"):
        Format.parse("q4k")
